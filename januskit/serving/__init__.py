"""Serving: an OpenAI-style HTTP API and a Gradio web UI over one model (`januskit serve`, `januskit ui`).

engine.py holds the model, the bounded queue and the batching worker; protocol.py and specs.py turn
requests into checked work; app.py is the FastAPI side, ui.py the Gradio side, server.py runs them.
Needs the `serve` extra (and `ui` for the web UI); nothing else in januskit imports this package.
"""
