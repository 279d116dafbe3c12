"""Guidance tab: every guidance method of survey Part II on one prompt and one seed, side by side,
or swept over one parameter, with time, NFE and (on ShapesWorld) measured scores under each image."""

from __future__ import annotations

import json

import gradio as gr

from components.params import parse_method_params
from components.outputs import write_pngs
from studio.compare import describe, run_compare
from studio.guidance.base import guidance_names
from studio.inverse.operators import MASKS, OPERATORS
from studio.pngmeta import read_parameters
from studio.registry import BUILTIN, DEFAULT_MODEL
from studio.requests import CompareRequest, GenerateRequest, MethodSpec

SAMPLERS = ["default", "ddim", "euler", "euler_a", "dpmpp_2m", "flow_euler", "flow_heun"]
DEFAULT_METHODS = ["cfg", "apg", "cfg_pp"]
SWEEPABLE = ["none", "guidance_scale"]


def parse_params(text: str) -> dict:
    """Per-method parameter overrides, JSON: {"apg": {"eta": 0.5}}."""
    return parse_method_params(text, '{"apg": {"eta": 0.5}}')


def parse_values(text: str) -> list[float]:
    try:
        vals = [float(v) for v in (text or "").replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"sweep values must be numbers separated by commas (got {text!r})") from None
    return vals


def ground_truth_path(upload, prompt: str) -> str:
    """The ground-truth image of an inverse problem: the upload, else the rendered ShapesWorld scene of the prompt."""
    if upload:
        return upload
    from studio.toyworld import world

    scene = world.parse_caption(prompt or "")
    if scene is None:
        raise ValueError("measurement guidance needs a ground-truth image: upload one, or write a ShapesWorld "
                         "prompt whose rendered scene serves as the truth")
    import tempfile

    from PIL import Image

    path = tempfile.NamedTemporaryFile(prefix="studio-truth-", suffix=".png", delete=False).name
    Image.fromarray(world.render(scene)).save(path)
    return path


def build_request(model, prompt, negative, methods, params_json, sampler, steps, scale, seed, sweep, sweep_values,
                  truth=None, operator="inpaint", mask="center") -> CompareRequest:
    if not (prompt or "").strip():
        raise ValueError("Please enter a prompt.")
    overrides = parse_params(params_json)
    measuring = [m for m in (methods or []) if m.startswith("measurement_")]
    if measuring:
        image = ground_truth_path(truth, prompt)
        for m in measuring:
            overrides[m] = {"operator_name": operator, "image": image, "mask": mask, "guidance_scale": 1.0,
                            **overrides.get(m, {})}
    unknown = set(overrides) - set(methods or [])
    if unknown:
        raise ValueError(f"parameters given for methods that are not selected: {', '.join(sorted(unknown))}")
    base = GenerateRequest(prompt=prompt, model=model, negative_prompt=negative or "",
                           sampler=None if sampler == "default" else sampler, steps=int(steps),
                           guidance_scale=float(scale), seed=int(seed or 0))
    return CompareRequest(base=base, methods=[MethodSpec(m, overrides.get(m, {})) for m in (methods or [])],
                          sweep_param=None if sweep == "none" else sweep,
                          sweep_values=parse_values(sweep_values) if sweep != "none" else [])


def compare_handler(session):
    def handler(model, prompt, negative, methods, params_json, sampler, steps, scale, seed, sweep, sweep_values,
                truth, operator, mask, progress=gr.Progress()):
        try:
            req = build_request(model, prompt, negative, methods, params_json, sampler, steps, scale, seed, sweep,
                                sweep_values, truth, operator, mask)
            req.validate()
            session.get(req.base.model)
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e))
        items, files, rows = [], [], []
        try:
            n = len(req.cells())
            for k, cell in enumerate(run_compare(session, req)):
                progress((k + 1) / n, desc=f"{cell.method} ({k + 1}/{n})")
                items.append((cell.result.images[0], describe(cell)))
                files += write_pngs(cell.result)
                rows.append([cell.method, round(cell.result.seconds, 3), cell.result.nfe,
                             None if cell.scores is None else bool(cell.scores["all_correct"]), json.dumps(cell.params)])
                yield items, files, rows
        except Exception as e:  # a failing method (bad parameter, interrupted run) is reported; earlier images stay
            if items:
                gr.Warning(f"stopped after {len(items)} image(s): {e}")
                yield items, files, rows
                return
            raise gr.Error(str(e) if isinstance(e, (ValueError, FileNotFoundError)) else f"{type(e).__name__}: {e}")

    return handler


def restore_from_png(file):
    """Dropping a studio PNG restores its prompt and settings."""
    if file is None:
        return [gr.update()] * 7
    try:
        p = read_parameters(file if isinstance(file, str) else file.name)
    except ValueError as e:
        raise gr.Error(str(e))
    return (gr.update(value=p.get("model", DEFAULT_MODEL)), gr.update(value=p.get("prompt", "")),
            gr.update(value=p.get("negative_prompt", "")), gr.update(value=p.get("sampler") or "default"),
            gr.update(value=p.get("steps", 25)), gr.update(value=p.get("guidance_scale", 5.0)),
            gr.update(value=p.get("seed", 0)))


def build(session) -> gr.Tab:
    names = guidance_names()
    with gr.Tab("Guidance") as tab:
        with gr.Row():
            with gr.Column(scale=2):
                model = gr.Dropdown(choices=list(BUILTIN), value=DEFAULT_MODEL, allow_custom_value=True, label="Model")
                prompt = gr.Textbox(label="Prompt", lines=2,
                                    value="a large red circle on the left on a gray background")
                negative = gr.Textbox(label="Negative prompt")
                methods = gr.CheckboxGroup(names, value=[m for m in DEFAULT_METHODS if m in names], label="Methods")
                params = gr.Code(label='Method parameters (JSON), e.g. {"apg": {"eta": 0.5}, "cfg_pp": {"guidance_scale": 0.6}}',
                                 language="json", value='{"cfg_pp": {"guidance_scale": 0.6}}', lines=3)
                with gr.Row():
                    sampler = gr.Dropdown(SAMPLERS, value="default", label="Sampler")
                    steps = gr.Slider(1, 150, value=25, step=1, label="Steps")
                with gr.Row():
                    scale = gr.Slider(0.0, 20.0, value=5.0, step=0.5, label="Guidance scale")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                with gr.Row():
                    sweep = gr.Dropdown(SWEEPABLE, value="none", label="Sweep (X axis)")
                    sweep_values = gr.Textbox(label="Sweep values", value="1, 3, 5, 7")
                with gr.Accordion("Inverse problem (measurement_soft / measurement_hard, survey §6)", open=False):
                    gr.Markdown("The measurement is taken from the ground truth: your image (the output size), or, "
                                "when none is given, the rendered ShapesWorld scene of the prompt. PSNR against it "
                                "shows under each picture.")
                    truth = gr.Image(label="Ground truth (optional)", type="filepath", height=160)
                    with gr.Row():
                        operator = gr.Dropdown(list(OPERATORS), value="inpaint", label="Operator")
                        mask = gr.Dropdown(list(MASKS), value="center", label="Inpainting mask (region to fill)")
                with gr.Row():
                    go = gr.Button("Compare", variant="primary")
                    stop = gr.Button("Stop")
                restore = gr.File(label="Drop a studio PNG to restore its settings", file_types=[".png"])
            with gr.Column(scale=3):
                gallery = gr.Gallery(format="png", label="Same seed, one image per method / setting", columns=3, height=520,
                                     object_fit="contain")
                table = gr.Dataframe(headers=["method", "seconds", "NFE", "all correct", "parameters"],
                                     label="Measurements", interactive=False)
                files = gr.File(label="PNGs with their parameters", file_count="multiple")
        inputs = [model, prompt, negative, methods, params, sampler, steps, scale, seed, sweep, sweep_values,
                  truth, operator, mask]
        go.click(compare_handler(session), inputs, [gallery, files, table], api_name="guidance_compare",
                 concurrency_id="gpu", concurrency_limit=1)
        stop.click(lambda: session.stop(), None, None, api_name="guidance_stop", queue=False)
        restore.upload(restore_from_png, restore, [model, prompt, negative, sampler, steps, scale, seed],
                       api_name="guidance_restore", queue=False)
    return tab
