"""Inversion tab (survey §8): a real image back to the noise and trajectory that reproduce it.

Upload any image (any size or mode; the tab shows how it was converted, cropped or padded and
resized) with its source prompt, pick the inversions to compare (DDIM §8.1, null-text §8.2,
negative-prompt §8.3, or the flow ODE run backwards on a flow-matching model), and see each
reconstruction next to the input with PSNR, SSIM, time and NFE. The results stay with the user's
session: "Edit this" hands the chosen one to the Editing tab as its source.

On ShapesWorld an empty upload means "render the prompt's scene": a held-out real image whose
ground truth is known.
"""

from __future__ import annotations

import time

import gradio as gr
import numpy as np

from studio import metrics
from studio.engine import Interrupted
from studio.imageprep import FITS, prepare_image
from studio.registry import BUILTIN, DEFAULT_MODEL

VP_METHODS = ["ddim", "null_text", "negative_prompt"]
FLOW_METHODS = ["flow", "null_text", "negative_prompt"]
LABELS = {"ddim": "DDIM inversion (§8.1)", "null_text": "null-text inversion (§8.2)",
          "negative_prompt": "negative-prompt inversion (§8.3)", "flow": "flow ODE backwards"}
HEADERS = ["method", "PSNR (dB)", "SSIM", "invert s", "reconstruct s", "NFE", "inner steps"]


def source_image(upload, prompt: str, size: tuple[int, int], fit: str) -> tuple[np.ndarray, str]:
    """The model-sized input and a note on how it was made (the upload, or a rendered ShapesWorld scene)."""
    if upload is not None:
        return prepare_image(upload, size, fit)
    from studio.toyworld import world

    scene = world.parse_caption(prompt or "")
    if scene is None:
        raise ValueError("upload an image to invert (or, on ShapesWorld, write a scene caption: its rendering "
                         "is used as the real image)")
    img = world.render(scene)
    if img.shape[:2] != tuple(size):
        return prepare_image(img, size, fit)
    return img, "rendered ShapesWorld scene of the prompt (ground truth known)"


def methods_for(bundle) -> list[str]:
    return FLOW_METHODS if bundle.kind == "flow" else VP_METHODS


def invert_handler(session):
    def handler(model, upload, fit, prompt, methods, steps, scale, inner_steps, early_stop, store,
                progress=gr.Progress()):
        from studio.inversion import invert, reconstruct

        try:
            if not (prompt or "").strip():
                raise ValueError("Please enter the source prompt (what the image shows).")
            if not methods:
                raise ValueError("Pick at least one inversion method.")
            if not (1 <= int(steps) <= 500):
                raise ValueError("steps must be between 1 and 500")
            if not (0.0 <= float(scale) <= 30.0):
                raise ValueError("the guidance scale must be between 0 and 30")
            bundle = session.get(model)
            allowed = methods_for(bundle)
            bad = [m for m in methods if m not in allowed]
            if bad:
                raise ValueError(f"{', '.join(bad)} does not apply to this "
                                 f"{'flow-matching' if bundle.kind == 'flow' else 'diffusion'} model; "
                                 f"choose from {', '.join(allowed)}")
            image, note = source_image(upload, prompt, bundle.default_size, fit)
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e))
        store = dict(store or {})
        items = [(image, f"input · {note}")]
        rows = []
        try:
            with session.job():
                for k, method in enumerate(methods):
                    def cb(phase, i, n, k=k, method=method):
                        progress(((k + (i + 1) / n) / len(methods)), desc=f"{method}: {phase} {i + 1}/{n}")

                    with session.run_scope(model) as b:
                        res = invert(b, image, prompt, method, steps=int(steps), guidance_scale=float(scale),
                                     num_inner_steps=int(inner_steps), early_stop=bool(early_stop),
                                     callback=cb, should_stop=session.should_stop)
                        rec = reconstruct(b, res, callback=cb, should_stop=session.should_stop)
                    out = rec.images[0]
                    p, s = metrics.psnr(out, image), metrics.ssim(out, image)
                    inner = f"{np.mean(res.inner_steps):.1f}/step" if res.inner_steps else ""
                    cap = (f"{LABELS[method]} · PSNR {p:.2f} dB · SSIM {s:.3f} · invert {res.seconds:.2f} s + "
                           f"reconstruct {rec.seconds:.2f} s · {res.nfe + rec.nfe} NFE · {res.steps} steps · CFG {res.guidance_scale:g}")
                    items.append((out, cap))
                    rows.append([method, round(p, 2), round(s, 4), round(res.seconds, 2), round(rec.seconds, 2),
                                 res.nfe + rec.nfe, inner])
                    store[method] = {"model": model, "result": res, "image": image, "prompt": prompt,
                                     "reconstruction": out, "psnr": p, "ssim": s, "time": time.time()}
                    yield items, rows, store, gr.update(choices=list(store), value=method)
        except Exception as e:  # a stop or failure keeps what finished
            msg = f"Stopped: {e}" if isinstance(e, Interrupted) else (
                str(e) if isinstance(e, (ValueError, FileNotFoundError)) else f"{type(e).__name__}: {e}")
            if len(items) > 1:
                gr.Warning(f"{msg} (the finished inversions are kept)")
                yield items, rows, store, gr.update(choices=list(store))
                return
            raise gr.Error(msg)

    return handler


def to_edit_source(store, method):
    """The chosen inversion as the Editing tab's source: (source state, tab switch, note)."""
    store = store or {}
    if not method or method not in store:
        raise gr.Error("Run an inversion first, then pick which one to edit.")
    entry = store[method]
    return ({"kind": "inversion", "method": method, **entry},
            gr.Tabs(selected="editing"),
            f"**Source:** {LABELS[method]} of your image (PSNR {entry['psnr']:.2f} dB) · prompt “{entry['prompt']}” · "
            f"model {entry['model']}")


def build(session) -> dict:
    """The tab; returns the handles the app wires to the Editing tab ("store", "pick", "send")."""
    with gr.Tab("Inversion", id="inversion"):
        store = gr.State({})
        with gr.Row():
            with gr.Column(scale=2):
                model = gr.Dropdown(choices=list(BUILTIN), value=DEFAULT_MODEL, allow_custom_value=True, label="Model")
                upload = gr.Image(label="Real image (any size or mode; empty on ShapesWorld: the prompt's scene)",
                                  type="filepath", image_mode=None, height=200)
                fit = gr.Radio(list(FITS), value="crop", label="Fit to the model's size",
                               info="crop: centre crop to its aspect; resize: stretch; pad: letterbox")
                prompt = gr.Textbox(label="Source prompt", lines=2,
                                    value="a large red circle on the left on a gray background")
                methods = gr.CheckboxGroup(["ddim", "null_text", "negative_prompt", "flow"],
                                           value=["ddim", "null_text", "negative_prompt"], label="Inversions")
                with gr.Row():
                    steps = gr.Slider(2, 200, value=50, step=1, label="Steps")
                    scale = gr.Slider(0.0, 20.0, value=5.0, step=0.5, label="Guidance scale (reconstruction / edit)")
                with gr.Accordion("Null-text optimisation (§8.2)", open=False):
                    with gr.Row():
                        inner = gr.Slider(1, 50, value=10, step=1, label="Max inner Adam steps per timestep")
                        early = gr.Checkbox(value=True, label="Early stop (per-step loss threshold)")
                with gr.Row():
                    go = gr.Button("Invert and reconstruct", variant="primary")
                    stop = gr.Button("Stop")
            with gr.Column(scale=3):
                gallery = gr.Gallery(format="png", label="Input and reconstructions", columns=4, height=420, object_fit="contain")
                table = gr.Dataframe(headers=HEADERS, label="Measurements (against the input above)", interactive=False)
                with gr.Row():
                    pick = gr.Dropdown(choices=[], label="Inversion to edit", allow_custom_value=False)
                    send = gr.Button("Edit this →")
        go.click(invert_handler(session), [model, upload, fit, prompt, methods, steps, scale, inner, early, store],
                 [gallery, table, store, pick], api_name="invert", concurrency_id="gpu", concurrency_limit=1)
        stop.click(lambda: session.stop(), None, None, api_name="invert_stop", queue=False)
    return {"store": store, "pick": pick, "send": send}
