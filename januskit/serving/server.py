"""Putting it together: engine + API (+ UI at /ui) under uvicorn, in the foreground or in a thread."""
from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from .app import create_app
from .engine import Engine, Limits

log = logging.getLogger("januskit.serving")


def build_server(pipe, *, model_id: str, limits: Limits = Limits(), threads: int | None = None,
                 ui: bool = True) -> tuple[FastAPI, Engine]:
    """The ASGI app and its engine. `ui`: mount the Gradio UI at /ui (needs the `ui` extra)."""
    engine = Engine(pipe, limits, threads)
    app = create_app(engine, model_id)
    if ui:
        import gradio as gr

        from .ui import build_ui

        app = gr.mount_gradio_app(app, build_ui(engine, model_id), path="/ui", footer_links=[])

        @app.get("/", include_in_schema=False)
        async def root() -> RedirectResponse:
            return RedirectResponse("/ui/")
    return app, engine


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """A live server on loopback in a background thread (tests, benches): `with ServerThread(...) as s:`
    then `s.url`. Stops uvicorn and the engine on exit."""

    def __init__(self, pipe, *, model_id: str = "januskit", limits: Limits = Limits(), ui: bool = False,
                 threads: int | None = None, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.app, self.engine = build_server(pipe, model_id=model_id, limits=limits, threads=threads, ui=ui)
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2, timeout_keep_alive=30))
        self._thread = threading.Thread(target=self.server.run, name="januskit-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self.engine.close()


def serve(pipe, *, model_id: str, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
          threads: int | None = None, ui: bool = True) -> None:
    app, engine = build_server(pipe, model_id=model_id, limits=limits, threads=threads, ui=ui)
    log.warning("januskit: serving %s on http://%s:%d (API under /v1%s)", model_id, host, port,
                ", web UI at /ui" if ui else "")
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5, timeout_keep_alive=30)
    finally:
        engine.close()
