"""One module per tab; each exposes build(session) -> gr.Tab."""
