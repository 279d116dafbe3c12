"""Controllable Generation Studio: the Gradio app.

    python app.py            # http://127.0.0.1:7860, on the shipped ShapesWorld model

`build_demo(session)` builds the Blocks; nothing is loaded or launched at import time.
"""

from __future__ import annotations

import os

import gradio as gr

from studio.session import SessionManager


def header_markdown(session: SessionManager) -> str:
    from studio.registry import BUILTIN, DEFAULT_MODEL, training_note

    note = training_note(BUILTIN[DEFAULT_MODEL])
    return ("## Controllable Generation Studio\n"
            "Steer diffusion and flow models, compare methods side by side. "
            f"Default model: **ShapesWorld** (shipped in `assets/`{'; ' + note if note else ''}). "
            f"Device: `{session.device}`.")


def build_demo(session: SessionManager | None = None) -> gr.Blocks:
    from tabs import editing, generate, guidance, inversion

    session = session or SessionManager()
    with gr.Blocks(title="Controllable Generation Studio") as demo:
        gr.Markdown(header_markdown(session))
        with gr.Tabs() as tabs:
            guidance.build(session)
            inv = inversion.build(session)
            ed = editing.build(session)
            generate.build(session)
        # "Edit this" in the Inversion tab: the chosen inversion becomes the Editing tab's source.
        inv["send"].click(inversion.to_edit_source, [inv["store"], inv["pick"]], [ed["source"], tabs, ed["note"]],
                          api_name="invert_to_edit").then(editing.mask_canvas, ed["source"], ed["mask"], queue=False,
                                                                api_visibility="private")
    return demo


def main() -> None:
    from studio.cli import quiet_environment

    quiet_environment()
    demo = build_demo()
    demo.queue(default_concurrency_limit=1).launch(
        server_name=os.environ.get("STUDIO_HOST", "127.0.0.1"), server_port=int(os.environ.get("STUDIO_PORT", "7860")))


if __name__ == "__main__":
    main()
