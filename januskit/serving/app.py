"""The HTTP API: OpenAI's chat completions (streaming too), image generations and image edits over one Engine.

Every request is checked before it queues (fields, images, prompt length against the context), so
the worker only sees work it can do; refusals are 4xx with an OpenAI error body naming the field.
While a request waits its handler watches the client: one that disconnects, or outlives the timeout,
is cancelled and frees its place in the queue.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .engine import Engine, ImageSpec, ImageToImageSpec, Job, QueueFull
from .errors import APIError
from .media import png_base64
from .protocol import (ChatCompletionRequest, ImageEditRequest, ImageGenerationRequest, edit_form, field_path,
                       to_messages)
from .specs import Source, chat_spec, check_sources, edit_spec, image_spec

log = logging.getLogger("januskit.serving")


class AsyncSink:
    """Engine events (worker thread) -> an asyncio queue on the server's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def __call__(self, kind: str, payload: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 before any parsing.
    The body is buffered (it is small by construction) and replayed to the app; later receive()
    calls go to the client, so disconnects are still seen."""

    def __init__(self, app, limit: int, read_timeout_s: float) -> None:
        self.app, self.limit, self.read_timeout_s = app, limit, read_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, int(declared))
        body, more = b"", True
        while more:
            try:
                msg = await asyncio.wait_for(receive(), self.read_timeout_s)
            except asyncio.TimeoutError:
                return await self._send(send, APIError(408, f"request body: nothing received for "
                                                            f"{self.read_timeout_s:g} s", param="body",
                                                       code="timeout", type="timeout_error"))
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(send, len(body))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send, size: int) -> None:
        await self._send(send, APIError(413, f"request body is {size} bytes, over the limit of {self.limit}",
                                        param="body", code="request_too_large"))

    @staticmethod
    async def _send(send, err: APIError) -> None:
        """The refusal, then the connection is closed: the rest of the body is never read."""
        payload = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": err.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


class CatchAll:
    """ASGI middleware, the last line of defence: an exception that escapes a handler (a bug) is logged
    and answered with a 500 in OpenAI's shape, and the connection stays open (Starlette's own handler
    answers in plain text and re-raises, so uvicorn drops the keep-alive connection)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(msg) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            log.exception("januskit: %s %s failed", scope.get("method"), scope.get("path"))
            if started:  # too late for a status; the client sees a cut response
                raise
            payload = json.dumps(APIError(500, f"internal error ({type(e).__name__})", type="server_error").body())
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload.encode()})


def create_app(engine: Engine, model_id: str) -> FastAPI:
    pipe, limits = engine.pipe, engine.limits
    app = FastAPI(title="januskit", version=__version__)
    app.state.engine = engine
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes, read_timeout_s=limits.read_timeout_s)
    app.add_middleware(CatchAll)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0]
        if first.get("type") == "json_invalid":
            at = next((f" at character {x}" for x in first.get("loc", ())[1:] if isinstance(x, int)), "")
            return JSONResponse(APIError(400, f"request body is not valid JSON{at}: {first.get('msg')}", param="body",
                                         code="invalid_json").body(), 400)
        # A union (content: str | list of parts) fails once per branch; the deepest error is the one the
        # client meant (a bad text part, not "content should be a string").
        first = max(errors, key=lambda x: len(x.get("loc", ())))
        param = field_path(tuple(first.get("loc", ())))
        msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            msg = "unknown or unsupported field"
        return JSONResponse(APIError(400, f"{param or 'body'}: {msg}", param=param or "body").body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals: a body it cannot parse (e.g. JSON nested past the parser's depth), an
        # unknown route or method.
        code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = ("request body could not be parsed as JSON (malformed or nested too deeply)"
               if e.status_code == 400 else str(e.detail))
        return JSONResponse(APIError(e.status_code, msg, code=code, param="body" if e.status_code == 400 else None)
                            .body(), e.status_code, headers=getattr(e, "headers", None))

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise APIError(404, f"model {name!r} is not served here (this server serves {model_id!r})",
                           param="model", code="model_not_found")

    def submit(job: Job) -> None:
        try:
            engine.submit(job)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry after {limits.retry_after_s} s", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(limits.retry_after_s)}) from None

    async def next_event(job: Job, sink: AsyncSink, request: Request) -> tuple[str, Any] | None:
        """The job's next event; None if the client went away (the job is cancelled)."""
        while True:
            left = job.submitted + limits.timeout_s - time.monotonic()
            if left <= 0:
                engine.cancel(job)
                raise APIError(504, f"request timed out after {limits.timeout_s:g} s", type="timeout_error",
                               code="timeout")
            try:
                return await asyncio.wait_for(sink.queue.get(), timeout=min(left, 0.25))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(job)
                    return None

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, "arch": pipe.arch, "waiting": engine.waiting,
                "running": engine.running, "max_queue": limits.max_queue, "completed": engine.completed}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "januskit"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        messages, system = await run_in_threadpool(to_messages, req, max_images=limits.max_images_per_request,
                                                   max_pixels=limits.max_image_pixels)
        spec = await run_in_threadpool(
            lambda: chat_spec(engine, messages, system, max_tokens=req.max_completion_tokens or req.max_tokens,
                              temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                              max_tokens_field="max_completion_tokens" if req.max_completion_tokens else "max_tokens"))
        sink = AsyncSink()
        job = Job(spec, sink)
        submit(job)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": now, "model": model_id, "system_fingerprint": f"januskit-{__version__}",
                "seed": spec.seed}
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(_sse(job, sink, request, head, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text = ""
        while (ev := await next_event(job, sink, request)) is not None:
            kind, payload = ev
            if kind == "text":
                text += payload
            elif kind == "error":
                raise APIError(500, f"generation failed: {payload}", type="server_error")
            elif kind == "done":
                return {**head, "object": "chat.completion",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": payload["finish_reason"], "logprobs": None}],
                        "usage": _usage(payload)}
        return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this

    async def _sse(job: Job, sink: AsyncSink, request: Request, head: dict, usage: bool) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            body = {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                try:
                    ev = await next_event(job, sink, request)
                except APIError as e:
                    yield f"data: {json.dumps(e.body())}\n\n"
                    return
                if ev is None:
                    return
                kind, payload = ev
                if kind == "text":
                    yield chunk({"content": payload})
                elif kind == "error":
                    yield f"data: {json.dumps(APIError(500, f'generation failed: {payload}', type='server_error').body())}\n\n"
                    return
                elif kind == "done":
                    yield chunk({}, payload["finish_reason"])
                    if usage:
                        body = {**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(payload)}
                        yield f"data: {json.dumps(body)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:
            engine.cancel(job)  # a no-op once done; frees the slot if the client left mid-stream

    @app.post("/v1/images/generations")
    async def images_generations(req: ImageGenerationRequest, request: Request):
        check_model(req.model)
        spec = await run_in_threadpool(
            lambda: image_spec(engine, req.prompt, n=req.n, seed=req.seed, cfg_weight=req.cfg_weight, steps=req.steps,
                               temperature=req.temperature, size=req.size))
        return await images(spec, req.prompt, request)

    @app.post("/v1/images/edits")
    async def images_edits(request: Request):
        ctype = request.headers.get("content-type", "")
        # A urlencoded form cannot hold files, but is still read: its refusal then names the missing image.
        if ctype.split(";")[0].strip().lower() not in ("multipart/form-data", "application/x-www-form-urlencoded"):
            raise APIError(415, f"body: image edits take multipart/form-data (the source images as file parts), "
                           f"got content-type {ctype[:60]!r}", param="body", code="unsupported_media_type")
        # The body is already within max_body_bytes (BodyLimit): a text part may be as long as that, so
        # that an over-long prompt is refused by the character limit, naming the field.
        try:
            async with request.form(max_part_size=limits.max_body_bytes) as form:
                fields, files = edit_form(form)
                try:
                    req = ImageEditRequest.model_validate(fields)
                except ValidationError as e:
                    raise RequestValidationError(e.errors()) from None
                check_model(req.model)
                check_sources(engine, len(files), req.strength)
                # A declared image type must match the bytes; a generic one (application/octet-stream) is
                # read from the bytes.
                sources = [Source(param, await f.read(),
                                  f.content_type if (f.content_type or "").startswith("image/") else None)
                           for param, f in files]
        except StarletteHTTPException as e:  # the multipart parser's refusals
            raise APIError(400, f"body: not valid multipart/form-data ({e.detail})", param="body",
                           code="invalid_multipart") from None
        spec = await run_in_threadpool(
            lambda: edit_spec(engine, req.prompt, sources, n=req.n, seed=req.seed, cfg_weight=req.cfg_weight,
                              cfg_image=req.cfg_image, strength=req.strength, temperature=req.temperature,
                              steps=req.steps, size=req.size))
        return await images(spec, req.prompt, request)

    async def images(spec: ImageSpec | ImageToImageSpec, prompt: str, request: Request):
        """Queue an image job and answer with its images (OpenAI's images response, PNG base64)."""
        sink = AsyncSink()
        job = Job(spec, sink)
        submit(job)
        while (ev := await next_event(job, sink, request)) is not None:
            kind, payload = ev
            if kind == "error":
                raise APIError(500, f"generation failed: {payload}", type="server_error")
            if kind == "done":
                data = await run_in_threadpool(lambda: [png_base64(im) for im in payload["images"]])
                return {"created": int(time.time()), "model": model_id, "seed": spec.seed,
                        "data": [{"b64_json": d, "revised_prompt": prompt} for d in data]}
        return JSONResponse({}, status_code=499)

    return app


def _usage(done: dict) -> dict:
    p, c = done["prompt_tokens"], done["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
