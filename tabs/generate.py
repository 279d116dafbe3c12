"""Text-to-image tab: prompt, negative prompt, sampler, steps, guidance scale, seed, size."""

from __future__ import annotations

import queue
import threading

import gradio as gr
import numpy as np

from components.outputs import caption_for, write_pngs
from studio.engine import Interrupted
from studio.registry import BUILTIN, DEFAULT_MODEL
from studio.requests import GenerateRequest

SAMPLERS = ["default", "ddim", "euler", "euler_a", "dpmpp_2m", "flow_euler", "flow_heun"]


def preview_image(bundle, x0) -> np.ndarray:
    img = bundle.decode(x0[:1]).float()
    img = ((img / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return img


def run_generate(session, req: GenerateRequest):
    """Generator: yields (preview or final image, caption, files) while the run goes on."""
    if not req.prompt.strip():
        raise gr.Error("Please enter a prompt.")
    try:
        req.validate()
        bundle = session.get(req.model)
    except (ValueError, FileNotFoundError) as e:
        raise gr.Error(str(e))
    q: "queue.Queue" = queue.Queue()
    every = 1 if bundle.family.startswith("shapesworld") else 5

    def cb(i, n, x, pred):
        if i % every == 0 or i == n - 1:
            q.put(("progress", i, n, pred.x0.detach().clone()))

    def work():
        try:
            q.put(("done", session.generate(req, callback=cb)))
        except Exception as e:  # reported in the UI below
            q.put(("error", e))

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item[0] == "progress":
            _, i, n, x0 = item
            yield preview_image(bundle, x0), f"step {i + 1}/{n}…", None
        elif item[0] == "done":
            res = item[1]
            yield res.images[0], caption_for(res, res.metadata["model"]), write_pngs(res)
            return
        else:
            e = item[1]
            if isinstance(e, Interrupted):
                raise gr.Error(f"Stopped: {e}")
            raise gr.Error(f"{type(e).__name__}: {e}" if not isinstance(e, (ValueError, FileNotFoundError)) else str(e))


def build(session) -> gr.Tab:
    with gr.Tab("Generate") as tab:
        with gr.Row():
            with gr.Column(scale=2):
                model = gr.Dropdown(choices=list(BUILTIN), value=DEFAULT_MODEL, allow_custom_value=True,
                                    label="Model", info="a registered name, a local diffusers folder, or a hub id")
                prompt = gr.Textbox(label="Prompt", value="a large red circle on the left on a gray background", lines=2)
                negative = gr.Textbox(label="Negative prompt", value="")
                with gr.Row():
                    sampler = gr.Dropdown(SAMPLERS, value="default", label="Sampler")
                    steps = gr.Slider(1, 150, value=25, step=1, label="Steps")
                with gr.Row():
                    scale = gr.Slider(0.0, 20.0, value=5.0, step=0.5, label="Guidance scale (CFG)")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                with gr.Row():
                    width = gr.Number(value=0, precision=0, label="Width (0: model default)")
                    height = gr.Number(value=0, precision=0, label="Height (0: model default)")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary")
                    stop = gr.Button("Stop")
            with gr.Column(scale=3):
                image = gr.Image(label="Result", type="numpy", format="png", height=384)
                info = gr.Markdown()
                files = gr.File(label="PNG with its parameters", file_count="multiple")

        def on_generate(model, prompt, negative, sampler, steps, scale, seed, width, height):
            req = GenerateRequest(prompt=prompt or "", model=model, negative_prompt=negative or "",
                                  sampler=None if sampler == "default" else sampler, steps=int(steps),
                                  guidance_scale=float(scale), seed=int(seed or 0),
                                  width=int(width) or None, height=int(height) or None)
            yield from run_generate(session, req)

        go.click(on_generate, [model, prompt, negative, sampler, steps, scale, seed, width, height], [image, info, files],
                 api_name="generate", concurrency_id="gpu", concurrency_limit=1)
        stop.click(lambda: session.stop(), None, None, api_name="stop", queue=False)
    return tab
