"""Putting it together: engine + API (+ UI at /ui) under uvicorn, in the foreground or in a thread."""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

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


def deadline_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for each request's headers. uvicorn times out an idle
    keep-alive connection (timeout_keep_alive), but not one that has sent nothing since it opened, nor
    one that has sent half a header, so either would hold its socket forever. The deadline runs from the
    connection's opening and from the first byte of each later request; an idle keep-alive connection
    stays uvicorn's to time out, so a client that pauses between requests is not cut off mid-send.
    (Stalled bodies are BodyLimit's.)"""

    class DeadlineH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._headers_late)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_late(self) -> None:
            self._deadline = None
            if self._idle() and not self.transport.is_closing():
                self.transport.close()  # a request's headers did not arrive in time

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self._idle():
                self._arm()  # the first bytes of a new request on a kept-alive connection
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return DeadlineH11


def _uvicorn_options(limits: Limits) -> dict:
    return dict(timeout_keep_alive=30, http=deadline_protocol(limits.read_timeout_s))


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
                                                    timeout_graceful_shutdown=2, **_uvicorn_options(limits)))
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
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5, **_uvicorn_options(limits))
    finally:
        engine.close()
