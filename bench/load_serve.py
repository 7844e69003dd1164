"""Load test of the server on loopback: a bounded burst of concurrent requests (chats with an image,
plain chats, image generations), then checks that the server survived and that no request was lost:
every request ends in a 200 or an explicit refusal (429 with Retry-After), nothing else.

    python bench/load_serve.py                         # 200 requests at once against the bundled model
    python bench/load_serve.py --requests 200 --retry  # clients honour Retry-After (at most --max-tries)

Only 127.0.0.1 is ever contacted (the server is started here, in this process). The run is bounded:
each request has a client timeout, and the whole burst a deadline (--deadline seconds).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

import januskit
from januskit.serving.engine import Limits
from januskit.serving.server import ServerThread
from januskit.world.render import render
from januskit.world.scene import Obj


def image_url() -> str:
    buf = io.BytesIO()
    render((Obj("circle", "red", 0), Obj("square", "blue", 3))).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request_body(i: int, url: str) -> tuple[str, dict]:
    kind = i % 3
    if kind == 0:
        return "/v1/images/generations", {"prompt": "a green triangle above a red circle", "n": 1, "seed": i}
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in this image?"}]
    if kind == 1:
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "max_tokens": 24, "seed": i}
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": "how many shapes?"}], "max_tokens": 8,
                                    "temperature": 0.8, "seed": i}


async def one(client: httpx.AsyncClient, base: str, i: int, url: str, retry: bool, max_tries: int) -> dict:
    path, body = request_body(i, url)
    t0, tries = time.perf_counter(), 0
    while True:
        tries += 1
        try:
            r = await client.post(base + path, json=body)
        except httpx.HTTPError as e:
            return {"i": i, "status": f"client error: {type(e).__name__}", "error": repr(e), "tries": tries,
                    "s": time.perf_counter() - t0}
        if r.status_code == 429:
            if "retry-after" not in r.headers or r.json()["error"]["code"] != "queue_full":
                return {"i": i, "status": "429 without Retry-After/queue_full", "tries": tries}
            if retry and tries < max_tries:
                await asyncio.sleep(float(r.headers["retry-after"]))
                continue
        ok = r.status_code == 200 and (("data" in r.json()) if "images" in path else bool(r.json()["choices"]))
        return {"i": i, "status": r.status_code if ok or r.status_code != 200 else "200 without a result",
                "tries": tries, "s": time.perf_counter() - t0, "path": path}


async def burst(base: str, n: int, retry: bool, max_tries: int, deadline: float) -> list[dict]:
    url = image_url()
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=deadline, limits=limits) as client:
        return await asyncio.wait_for(asyncio.gather(*(one(client, base, i, url, retry, max_tries) for i in range(n))),
                                      timeout=deadline)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-queue", type=int, default=32)
    ap.add_argument("--retry", action="store_true", help="clients wait Retry-After and try again")
    ap.add_argument("--max-tries", type=int, default=60)
    ap.add_argument("--deadline", type=float, default=900.0, help="seconds for the whole burst")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = januskit.load(Path(januskit.__file__).parent / "assets" / "default-model")
    with ServerThread(pipe, model_id="load", limits=Limits(max_queue=args.max_queue)) as s:
        t0 = time.perf_counter()
        results = asyncio.run(burst(s.url, args.requests, args.retry, args.max_tries, args.deadline))
        wall = time.perf_counter() - t0
        health = httpx.get(s.url + "/health").json()
        batches = Counter((k, j) for k, j, _ in s.engine.batches)
    statuses = Counter(str(r["status"]) for r in results)
    done = [r["s"] for r in results if r["status"] == 200]
    report = {
        "requests": args.requests, "retry": args.retry, "max_queue": args.max_queue, "wall_s": round(wall, 2),
        "statuses": dict(statuses), "answered": len(results), "lost": args.requests - len(results),
        "unexpected": {k: v for k, v in statuses.items() if k not in ("200", "429")},
        "tries_max": max(r["tries"] for r in results),
        "latency_s": {"p50": round(statistics.median(done), 3), "p95": round(sorted(done)[int(0.95 * (len(done) - 1))], 3),
                      "max": round(max(done), 3)} if done else None,
        "throughput_rps": round(len(done) / wall, 2), "server_after": health,
        "client_errors": [(r["i"], r["tries"], round(r["s"], 2), r["error"]) for r in results if "error" in r],
        "batch_sizes": {f"{k}x{j}": v for (k, j), v in sorted(batches.items())},
    }
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if report["lost"] or report["unexpected"] or health["status"] != "ok":
        raise SystemExit("load test: lost or unexpected responses (see above)")


if __name__ == "__main__":
    main()
