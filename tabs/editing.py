"""Editing tab (survey §7): change what was asked, keep the rest, and see which method did it best.

The source is an inverted real image (from the Inversion tab, "Edit this") or a generated one
(prompt + seed here). Pick any editing methods, a target prompt and, for the mask-guided ones, paint
the region to edit; all methods run on the same source side by side. Under each result: time, NFE,
preservation (PSNR to the source replay outside the edited region) and, on ShapesWorld, whether the
evaluator reads the target prompt in the result. The attention viewer shows the cross-attention map
of any prompt token over the image, averaged over the layers and steps you choose.
"""

from __future__ import annotations

import json

import gradio as gr
import numpy as np

from components.params import parse_method_params
from studio import metrics
from studio.engine import Interrupted
from studio.registry import BUILTIN, DEFAULT_MODEL

DEFAULT_METHODS = ["sdedit", "p2p_swap", "masactrl"]


def method_names() -> list[str]:
    from studio.editing import METHODS

    return list(METHODS)


def method_help() -> str:
    from studio.editing import METHODS

    return "\n".join(f"- **{m.name}** ({m.section}): {m.help} Defaults: `{json.dumps(m.defaults)}`"
                     f"{' · needs a painted mask' if m.needs_mask else ''}" for m in METHODS.values())


def parse_params(text: str) -> dict:
    """Per-method parameter overrides, JSON: {"sdedit": {"strength": 0.6}}."""
    return parse_method_params(text, '{"sdedit": {"strength": 0.6}}')


def mask_from_editor(value, size: tuple[int, int]):
    """The painted region of a gr.ImageMask value as a float HxW mask at `size`; None when nothing is painted."""
    if not value:
        return None
    layers = value.get("layers") if isinstance(value, dict) else None
    if not layers:
        return None
    from PIL import Image

    from studio.imageprep import load_image

    m = None
    for layer in layers:
        if layer is None:
            continue
        a = np.asarray(load_image(layer).convert("RGBA"))[..., 3] > 0
        m = a if m is None else (m | a)
    if m is None or not m.any():
        return None
    if m.shape != tuple(size):
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((size[1], size[0]), Image.Resampling.NEAREST)) > 127
    return m.astype(np.float32)


def shapesworld_reading(image: np.ndarray, prompt: str):
    """(all correct, short reading) of the evaluator for `prompt`, or None when it is no ShapesWorld caption."""
    from studio.toyworld import evaluator, world

    scene = world.parse_caption(prompt or "")
    if scene is None:
        return None
    s = evaluator.score(image, scene)
    return bool(s["all_correct"]), ("✓ reads as the target" if s["all_correct"] else
                                    "✗ " + ", ".join(k for k in ("color", "shape", "size", "position", "background")
                                                     if not s[k]) or "✗ problems in the reading")


def generated_source(session, model, prompt, seed, steps, scale):
    from studio.editing import source_from_generation

    if not (prompt or "").strip():
        raise gr.Error("Please enter the prompt of the source image.")
    try:
        with session.run_scope(model) as b:
            src = source_from_generation(b, prompt, seed=int(seed or 0), steps=int(steps), guidance_scale=float(scale))
    except (ValueError, FileNotFoundError) as e:
        raise gr.Error(str(e))
    state = {"kind": "generated", "model": model, "source": src, "image": src.image, "prompt": prompt}
    note = f"**Source:** generated · prompt “{prompt}” · seed {int(seed or 0)} · {int(steps)} steps · CFG {float(scale):g} · model {model}"
    return state, note, gr.update(value={"background": src.image, "layers": [], "composite": src.image})


def edit_source_of(state):
    """The EditSource of the tab's source state (built from an inversion result when needed)."""
    from studio.editing import EditSource

    if not state:
        raise ValueError("No source yet: invert an image in the Inversion tab (then “Edit this”), "
                         "or generate a source here.")
    if state.get("source") is None:
        state["source"] = EditSource.from_inversion(state["result"], image=state["image"])
    return state["source"]


def edit_handler(session):
    def handler(state, target, methods, params_json, mask_value, progress=gr.Progress()):
        from studio.editing import METHODS, edit, reconstruct_source

        try:
            if not methods:
                raise ValueError("Pick at least one editing method.")
            unknown = [m for m in methods if m not in METHODS]
            if unknown:
                raise ValueError(f"unknown editing method(s): {', '.join(unknown)}")
            if any(METHODS[m].needs_target_prompt for m in methods) and not (target or "").strip():
                raise ValueError("Please enter the target prompt (the edited description).")
            overrides = parse_params(params_json)
            extra = set(overrides) - set(methods)
            if extra:
                raise ValueError(f"parameters given for methods that are not selected: {', '.join(sorted(extra))}")
            src = edit_source_of(state)
            mask = mask_from_editor(mask_value, (src.height, src.width))
            needing = [m for m in methods if METHODS[m].needs_mask]
            if needing and mask is None:
                raise ValueError(f"{', '.join(needing)} need(s) a mask: paint the region to edit on the source image")
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e))
        model = state["model"]
        items, rows = [], []
        try:
            with session.job():
                with session.run_scope(model) as b:
                    replay = reconstruct_source(b, src)
                items.append((replay, f"source replay · {state.get('method', 'generated')}"))
                for k, m in enumerate(methods):
                    def cb(i, n, k=k, m=m):
                        progress((k + (i + 1) / n) / len(methods), desc=f"{m} {i + 1}/{n}")

                    with session.run_scope(model) as b:
                        res = edit(b, src, m, target or "", params=overrides.get(m), mask=mask, callback=cb,
                                   should_stop=session.should_stop)
                    region = res.mask if res.mask is not None else mask
                    keep = None if region is None else (np.asarray(region) < 0.5)
                    pres = metrics.psnr(res.image, replay, mask=keep) if keep is not None else metrics.psnr(res.image, replay)
                    reading = shapesworld_reading(res.image, target)
                    cap = (f"{m} · {json.dumps(res.params)} · {res.seconds:.2f} s · {res.nfe} NFE · "
                           f"preservation {pres:.1f} dB{' outside the mask' if keep is not None else ' (whole image)'}"
                           + (f" · {reading[1]}" if reading else ""))
                    items.append((res.image, cap))
                    if res.mask is not None and mask is None:
                        items.append(((np.asarray(res.mask)[..., None] * 255).repeat(3, -1).astype(np.uint8),
                                      f"{m}: computed mask"))
                    rows.append([m, round(res.seconds, 2), res.nfe, round(pres, 2),
                                 None if reading is None else reading[0], json.dumps(res.params)])
                    yield items, rows
        except Exception as e:
            msg = f"Stopped: {e}" if isinstance(e, Interrupted) else (
                str(e) if isinstance(e, (ValueError, FileNotFoundError)) else f"{type(e).__name__}: {e}")
            if len(items) > 1:
                gr.Warning(f"{msg} (finished edits are kept)")
                yield items, rows
                return
            raise gr.Error(msg)

    return handler


def token_choices(session):
    def handler(state):
        from studio.attention.viewer import prompt_tokens

        if not state:
            return gr.update(choices=[], value=None)
        try:
            toks = prompt_tokens(session.get(state["model"]), state["prompt"])
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e))
        return gr.update(choices=toks, value=None)

    return handler


def mask_canvas(state):
    """Show the source image in the mask painter."""
    if not state or state.get("image") is None:
        return gr.update()
    return gr.update(value={"background": state["image"], "layers": [], "composite": state["image"]})


def attention_handler(session):
    def handler(state, token, start, end, layers):
        from studio.attention.viewer import cross_attention_map

        try:
            src = edit_source_of(state)
            if token in (None, ""):
                raise ValueError("Pick a prompt token.")
            if not 0.0 <= float(start) < float(end) <= 1.0:
                raise ValueError("the step range must satisfy 0 ≤ from < to ≤ 1")
            with session.run_scope(state["model"]) as b:
                amap = cross_attention_map(b, src, token, layers=layers_list(layers) or None,
                                           steps=(float(start), float(end)))
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e))
        return overlay(state["image"] if state.get("image") is not None else src.image, amap)

    return handler


def overlay(image: np.ndarray, amap: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """The map (HxW in [0, 1]) as a heat colour over the image, upscaled so a 64 px image stays readable."""
    from PIL import Image

    a = np.clip(np.asarray(amap, np.float32), 0, 1)
    heat = np.stack([a, a ** 2, 1 - a], -1) * 255  # blue (low) to yellow-white (high)
    out = (1 - alpha) * image.astype(np.float32) + alpha * heat
    out = out.clip(0, 255).astype(np.uint8)
    if out.shape[0] < 256:
        k = 256 // out.shape[0]
        out = np.asarray(Image.fromarray(out).resize((out.shape[1] * k, out.shape[0] * k), Image.Resampling.NEAREST))
    return out


def build(session) -> dict:
    """The tab; returns its handles ("source", "note", "mask") for the app to wire the Inversion tab to."""
    names = method_names()
    with gr.Tab("Editing", id="editing"):
        source = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                note = gr.Markdown("**Source:** none yet: invert an image in the Inversion tab and press "
                                   "“Edit this”, or generate one below.")
                with gr.Accordion("Generate a source instead", open=False):
                    model = gr.Dropdown(choices=list(BUILTIN), value=DEFAULT_MODEL, allow_custom_value=True, label="Model")
                    gprompt = gr.Textbox(label="Source prompt", value="a large red circle on the left on a gray background")
                    with gr.Row():
                        gseed = gr.Number(value=0, precision=0, label="Seed")
                        gsteps = gr.Slider(2, 200, value=50, step=1, label="Steps")
                        gscale = gr.Slider(0.0, 20.0, value=5.0, step=0.5, label="Guidance scale")
                    gen = gr.Button("Use this generated source")
                target = gr.Textbox(label="Target prompt", value="a large blue circle on the left on a gray background")
                methods = gr.CheckboxGroup(names, value=[m for m in DEFAULT_METHODS if m in names], label="Methods")
                params = gr.Code(label='Method parameters (JSON), e.g. {"sdedit": {"strength": 0.6}}', language="json",
                                 value="", lines=3)
                mask = gr.ImageMask(label="Region to edit (paint over the source; for blended, kv_reuse, local blend)",
                                    type="numpy", height=320, image_mode="RGB")
                with gr.Row():
                    go = gr.Button("Edit", variant="primary")
                    stop = gr.Button("Stop")
                with gr.Accordion("Methods and their parameters", open=False):
                    gr.Markdown(method_help())
            with gr.Column(scale=3):
                gallery = gr.Gallery(format="png", label="Source replay and edits", columns=3, height=460, object_fit="contain")
                table = gr.Dataframe(headers=["method", "seconds", "NFE", "preservation (dB)", "reads as target", "parameters"],
                                     label="Measurements", interactive=False)
                with gr.Accordion("Attention viewer", open=True):
                    with gr.Row():
                        token = gr.Dropdown(choices=[], label="Prompt token", allow_custom_value=True)
                        start = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Steps from (fraction)")
                        end = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="to")
                    layers = gr.Textbox(label="Layers (comma-separated names or patterns; empty: all cross-attention)", value="")
                    show = gr.Button("Show attention map")
                    amap = gr.Image(label="Cross-attention over the source", type="numpy", height=280)
        gen.click(lambda *a: generated_source(session, *a), [model, gprompt, gseed, gsteps, gscale],
                  [source, note, mask], api_name="edit_source_generate", concurrency_id="gpu", concurrency_limit=1)
        go.click(edit_handler(session), [source, target, methods, params, mask], [gallery, table], api_name="edit",
                 concurrency_id="gpu", concurrency_limit=1)
        stop.click(lambda: session.stop(), None, None, api_name="edit_stop", queue=False)
        source.change(token_choices(session), source, token, queue=False, api_visibility="private")
        show.click(attention_handler(session),
                   [source, token, start, end, layers], amap, api_name="attention_map", concurrency_id="gpu",
                   concurrency_limit=1)
    return {"source": source, "note": note, "mask": mask}


def layers_list(text: str) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]
