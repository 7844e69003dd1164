"""Hostile traffic against `januskit serve` on loopback: counts by status, /health's worst latency during
the run, the server's RSS before and after, tracebacks in its log.

    .venv/bin/python bench/fuzz_serve.py                      # 10,000 requests, at most 15 minutes
    .venv/bin/python bench/fuzz_serve.py --requests 2000 --workers 4 --json /tmp/fuzz.json

The server runs as a subprocess (`januskit serve --no-ui` on the bundled model, one thread) so its RSS
is its own. Each request is drawn from a seeded generator of what an attacker or a careless client
sends: mutated JSON (wrong types, huge and negative numbers, lone surrogates, deep nesting, unknown
fields, truncation, invalid UTF-8), hostile images (header-declared decompression bombs, 1-bit strips,
ICO/PPM, flipped and truncated bytes, declared types that do not match the bytes), over-long prompts,
unknown routes and methods; about 3% are valid chats and image requests, which must succeed. A few
sockets that stall mid-header and mid-body are opened at the start; they must be closed by the server's
read timeout. Loopback only; bounded in count (--requests) and time (--max-seconds).
"""
from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from januskit.serving.server import free_port  # noqa: E402
from januskit.world.render import render  # noqa: E402
from januskit.world.scene import Obj  # noqa: E402

CHAT, IMAGES = "/v1/chat/completions", "/v1/images/generations"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- hostile images ------------------------------------------------------------------------------

def _png(w: int, h: int, depth: int = 1, color: int = 0, rows: int | None = None) -> bytes:
    """A PNG whose header says w x h; only `rows` rows of (zero) data, so it stays small."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    row = b"\0" + b"\0" * ((w * depth + 7) // 8)
    raw = zlib.compress(row * (h if rows is None else rows), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def image_corpus() -> list[tuple[str, str, bytes]]:
    """(name, declared MIME type, bytes): valid images and hostile ones."""
    scene = render((Obj("circle", "red", 0), Obj("square", "blue", 3)))
    ok = [(f"ok-{f.lower()}", f"image/{f.lower()}", _encoded(scene, f)) for f in ("PNG", "JPEG", "GIF", "BMP", "WEBP")]
    ico = _encoded(scene, "ICO")
    bad = [("bomb-header", "image/png", base64.b64decode(
               "iVBORw0KGgoAAAANSUhEUgAATiAAAE4gAQAAAADLC3uUAAAAAElFTkSuQmCC")),
           ("strip-16M", "image/png", _png(16_000_000, 1)),
           ("square-12000", "image/png", _png(12000, 12000, rows=1)),
           ("ppm-bad-header", "image/png", base64.b64decode("UDYKMf8gMQoyNTUKAAAA")),
           ("ppm", "image/x-portable-pixmap", b"P6\n20000 20000\n255\n" + b"\0" * 64),
           ("ico", "image/x-icon", ico), ("ico-as-png", "image/png", ico),
           ("jpeg-as-png", "image/png", ok[1][2]), ("empty", "image/png", b""),
           ("text", "image/png", b"not an image at all")]
    return ok + bad


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(3)
    if kind == 0 and b:  # flips, biased to the header
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(len(b), 64)) if rng.random() < 0.7 else rng.randrange(len(b))
            b[i] = rng.randrange(256)
    elif kind == 1:  # truncation
        b = b[:rng.randrange(len(b) + 1)]
    else:  # a width/height-like field blown up
        i = rng.randrange(max(1, min(len(b) - 4, 32)))
        b[i:i + 4] = struct.pack(">I", rng.choice([0, 1, 65535, 2**31 - 1, 2**32 - 1, 20000]))
    return bytes(b)


MAX_BODY = 64 * 2**20  # 4x the server's body limit

# -- hostile JSON --------------------------------------------------------------------------------

WEIRD = [None, True, -1, 0, 2**70, -2**70, 1e308, -0.0, "", " ", "\ud800", "x\udfffy", "\x00", "<image_placeholder>",
         [], {}, [[[[[]]]]], {"a": {"b": {"c": 1}}}, "A" * 5000, "🙂" * 100, 3.5, "NaN", "-1"]


def valid_chat(rng: random.Random, url: str | None = None) -> dict:
    content: object = rng.choice(["hi", "What colour is the square?", "Describe the image."])
    if url is not None:
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in this image?"}]
    return {"model": "mini", "messages": [{"role": "user", "content": content}], "max_tokens": 2,
            "temperature": rng.choice([0.0, 0.7])}


def valid_image(rng: random.Random) -> dict:
    return {"model": "mini", "prompt": rng.choice(["a red circle", "a blue square to the left of a green triangle"]),
            "n": 1, "seed": rng.randrange(1000)}


def _paths(obj, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def mutate_json(rng: random.Random, obj: dict) -> dict:
    obj = json.loads(json.dumps(obj))
    replicated = False  # one list replication per body: repeated ones compound to gigabytes
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(obj) if p]
        if not paths:
            break
        p = rng.choice(paths)
        parent = obj
        for k in p[:-1]:
            parent = parent[k]
        op = rng.randrange(4)
        if op == 0:
            parent[p[-1]] = rng.choice(WEIRD)
        elif op == 1 and isinstance(parent, dict):
            del parent[p[-1]]
        elif op == 2 and isinstance(parent, dict):
            parent[rng.choice(["frobnicate", "stream", "n", "seed", "top_p", "stream_options", "guidance", "steps",
                               "size", "response_format", "cfg_weight", "temperature"])] = rng.choice(WEIRD)
        elif not replicated:
            parent[p[-1]] = [parent[p[-1]]] * rng.randint(0, 5)
            replicated = True
    return obj


class Corpus:
    """A seeded stream of (kind, method, path, body bytes, content-type)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.images = image_corpus()

    def _image_url(self) -> str:
        name, mime, data = self.rng.choice(self.images)
        if self.rng.random() < 0.4:
            data = mutate_bytes(self.rng, data)
        if self.rng.random() < 0.15:
            mime = self.rng.choice(["image/png", "image/jpeg", "image/gif", "text/plain", "image/svg+xml"])
        return f"data:{mime};base64," + base64.b64encode(data).decode()

    def draw(self) -> tuple[str, str, str, bytes, str]:
        """Redraws the rare body over MAX_BODY (nested list mutations compound): the server refuses
        those by their Content-Length alone, and building gigabytes here would stall this client."""
        while len((item := self._draw())[3]) > MAX_BODY:
            pass
        return item

    def _draw(self) -> tuple[str, str, str, bytes, str]:
        r = self.rng
        u = r.random()
        if u < 0.02:
            return "valid-chat", "POST", CHAT, json.dumps(valid_chat(r)).encode(), "application/json"
        if u < 0.03:
            return "valid-image", "POST", IMAGES, json.dumps(valid_image(r)).encode(), "application/json"
        if u < 0.35:
            body = mutate_json(r, valid_chat(r, self._image_url() if r.random() < 0.3 else None))
            return "json-chat", "POST", CHAT, json.dumps(body).encode(), "application/json"
        if u < 0.55:
            return "json-image", "POST", IMAGES, json.dumps(mutate_json(r, valid_image(r))).encode(), "application/json"
        if u < 0.75:
            body = valid_chat(r, self._image_url())
            return "image", "POST", CHAT, json.dumps(body).encode(), "application/json"
        if u < 0.85:  # bytes-level damage
            raw = json.dumps(valid_chat(r) if r.random() < 0.5 else valid_image(r)).encode()
            choice = r.randrange(5)
            if choice == 0:
                raw = raw[:r.randrange(len(raw))]
            elif choice == 1:
                raw = raw.replace(b'"hi"', b'"\xff\xfe"').replace(b'"a red circle"', b'"\xc3("')
            elif choice == 2:
                raw = b"[" * r.choice([100, 1000, 100000]) + b"]" * r.choice([0, 10])
            elif choice == 3:
                raw = bytes(r.randrange(256) for _ in range(r.randrange(1, 200)))
            else:
                raw = raw.replace(b'"messages"', b'"messages" : ' + b'{"x":' * 500, 1)
            return "bytes", "POST", r.choice([CHAT, IMAGES]), raw, r.choice(["application/json", "text/plain", ""])
        if u < 0.92:  # long text, under the body limit and (24 and 40 MB) over it
            n = r.choice([200_000, 1_000_000, 4_000_000, 24_000_000, 40_000_000])
            if r.random() < 0.5:
                body = {"messages": [{"role": "user", "content": "a b " * (n // 4)}], "max_tokens": 2}
                return "long", "POST", CHAT, json.dumps(body).encode(), "application/json"
            return "long", "POST", IMAGES, json.dumps({"prompt": "red " * (n // 4)}).encode(), "application/json"
        method = r.choice(["GET", "PUT", "DELETE", "POST", "PATCH"])
        path = r.choice(["/v1/models", "/health", "/v1/nothing", "/../../etc/passwd", "/v1/chat/completions?x=1",
                         "/v1/images/generations/", "/%00", "/v1/" + "a" * 2000])
        return "route", method, path, b"{}" if method != "GET" else b"", "application/json"


def stall_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    """Half a header, or a declared body that never comes."""
    out = []
    for i in range(n):
        s = socket.create_connection((host, port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" if i % 2 == 0 else
                  b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"mes")
        out.append(s)
    return out


def closed(s: socket.socket) -> bool:
    s.settimeout(0.5)
    try:
        while True:  # drain a 408 if one was sent; b"" means the server closed it
            if not s.recv(65536):
                return True
    except (socket.timeout, BlockingIOError):
        return False
    except OSError:
        return True


def monitor(base: str, out: Path) -> None:
    """Polls /health every 0.25 s until terminated; one "start latency" line per poll (monotonic clock)."""
    with httpx.Client(base_url=base, timeout=60) as c, out.open("w") as f:
        while True:
            t = time.monotonic()
            try:
                c.get("/health").raise_for_status()
                dt = time.monotonic() - t
            except httpx.HTTPError:
                dt = float("inf")
            f.write(f"{t} {dt}\n")
            f.flush()
            time.sleep(0.25)


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--monitor":
        monitor(sys.argv[2], Path(sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--max-seconds", type=float, default=900)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stalled", type=int, default=20, help="sockets that stall mid-request")
    ap.add_argument("--read-timeout", type=float, default=5.0, help="the server's --read-timeout")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    port = free_port()
    log_path = Path(f"/tmp/fuzz_serve_{port}.log")
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "januskit.cli", "serve", "--no-ui", "--port", str(port),
                             "--threads", "1", "--max-tokens", "8", "--name", "mini",
                             "--read-timeout", str(args.read_timeout)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while True:
            try:
                httpx.get(base + "/health", timeout=2)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > end:
                    raise SystemExit(f"server did not start; see {log_path}")
                time.sleep(0.2)
        with httpx.Client(base_url=base, timeout=120) as c:  # one of each valid kind warms up both paths
            assert c.post(CHAT, json=valid_chat(random.Random(0))).status_code == 200
            assert c.post(IMAGES, json=valid_image(random.Random(0))).status_code == 200
        rss_start = rss_mb(proc.pid)
        stalled = stall_sockets("127.0.0.1", port, args.stalled)

        corpus, lock = Corpus(args.seed), threading.Lock()
        counts: collections.Counter = collections.Counter()
        by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        failures: list[dict] = []
        spans: list[tuple[float, float, str]] = []  # (start, end, what) of every request, for slow polls
        done = [0]
        rss_2000 = [None]
        stop = threading.Event()
        t_end = time.monotonic() + args.max_seconds

        def worker() -> None:
            with httpx.Client(base_url=base, timeout=120) as c:
                while not stop.is_set():
                    with lock:
                        if done[0] >= args.requests or time.monotonic() > t_end:
                            return
                        done[0] += 1
                        kind, method, path, body, ctype = corpus.draw()
                    t_req = time.monotonic()
                    try:
                        r = c.request(method, path, content=body, headers={"content-type": ctype} if ctype else {})
                        status, text = r.status_code, r.text
                        shaped = False
                        try:
                            shaped = r.status_code < 400 or set(r.json()["error"]) == {"message", "type", "param",
                                                                                         "code"}
                        except Exception:
                            pass
                    except httpx.HTTPError as e:
                        status, text, shaped = f"conn:{type(e).__name__}", str(e), False
                    with lock:
                        spans.append((t_req, time.monotonic(), f"{kind} {method} {path[:40]} {len(body)} B -> {status}"))
                        counts[status] += 1
                        by_kind[kind][status] += 1
                        bad = (isinstance(status, str) or status >= 500 or not shaped
                               or (kind.startswith("valid") and status not in (200, 429)))
                        if bad:
                            counts["unshaped" if not shaped else "bad"] += 0
                            if len(failures) < 20:
                                failures.append({"kind": kind, "path": path, "status": status, "body": text[:300],
                                                 "request": body[:200].decode("utf-8", "replace")})
                            counts["failures"] += 1
                        if done[0] == 2000 and rss_2000[0] is None:
                            rss_2000[0] = rss_mb(proc.pid)

        t0 = time.monotonic()
        # /health is polled from its own process: this one's threads build large bodies under the GIL,
        # which would show up as the server's latency.
        health_log = log_path.with_suffix(".health")
        mon = subprocess.Popen([sys.executable, __file__, "--monitor", base, str(health_log)])
        threads = [threading.Thread(target=worker) for _ in range(args.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        mon.terminate()
        mon.wait()
        health = [tuple(map(float, line.split())) for line in health_log.read_text().splitlines() if line.strip()]
        elapsed = time.monotonic() - t0
        time.sleep(max(0.0, args.read_timeout + 1 - elapsed))
        n_closed = sum(closed(s) for s in stalled)
        with httpx.Client(base_url=base, timeout=120) as c:
            healthy = c.get("/health").json()["status"] == "ok"
            still_works = c.post(CHAT, json=valid_chat(random.Random(1))).status_code == 200
        rss_end = rss_mb(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    tracebacks = log_path.read_text(errors="replace").count("Traceback")
    hs = sorted(dt for _, dt in health)
    slow = []
    for t, dt in health:
        if dt > 1.0 and len(slow) < 10:
            slow.append({"at_s": round(t - t0, 1), "latency_s": round(dt, 2),
                         "in_flight": [w for a, b, w in spans if a < t + dt and b > t]})
    report = {
        "requests": sum(v for k, v in counts.items() if k != "failures"), "seconds": round(elapsed, 1),
        "by_status": {str(k): v for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])) if k != "failures"},
        "by_kind": {k: {str(s): n for s, n in sorted(v.items(), key=lambda kv: str(kv[0]))} for k, v in by_kind.items()},
        "failures": counts["failures"], "failure_samples": failures,
        "health_polls": len(hs), "health_worst_s": round(hs[-1], 3) if hs else None,
        "health_p99_s": round(hs[int(0.99 * (len(hs) - 1))], 3) if hs else None,
        "health_slow_samples": slow,
        "rss_start_mb": round(rss_start, 1), "rss_after_2000_mb": None if rss_2000[0] is None else round(rss_2000[0], 1),
        "rss_end_mb": round(rss_end, 1), "rss_ratio": round(rss_end / rss_start, 2),
        "stalled_sockets_closed": f"{n_closed}/{len(stalled)}", "healthy_after": healthy,
        "valid_chat_after": still_works, "server_tracebacks": tracebacks, "server_log": str(log_path),
    }
    print(json.dumps(report, indent=1, default=str))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    ok = (report["failures"] == 0 and tracebacks == 0 and healthy and still_works and n_closed == len(stalled))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
