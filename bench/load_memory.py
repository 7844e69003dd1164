"""Peak memory and time of loading a checkpoint folder, measured in a fresh process.

    python bench/load_memory.py /tmp/janus-pro-7b --init janus-pro-7b --dtype bfloat16

With --init PRESET a random-weight folder of that preset is written first (bf16 for the 7B: 15 GB on
disk) when the folder does not exist yet. The load runs in a child process so its peak RSS
(ru_maxrss) is the loader's own; the claim to check is that a 7B folder loads in bf16 within 24 GiB,
i.e. with no second full copy of the weights.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
t = time.perf_counter()
import januskit
pipe = januskit.load(sys.argv[1], dtype=sys.argv[2])
secs = time.perf_counter() - t
n = sum(p.numel() for p in pipe.model.parameters())
print(json.dumps(dict(seconds=round(secs, 1), parameters=n, peak_rss_gib=round(
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
    weights_gib=round(sum(p.numel() * p.element_size() for p in pipe.model.parameters()) / 1024**3, 2))))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--init", default=None, help="preset to write first if the folder is missing")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    folder = Path(args.folder)
    if args.init and not folder.exists():
        from januskit import resolve_dtype
        from januskit.checkpoint.init import init_checkpoint

        t = time.perf_counter()
        init_checkpoint(folder, preset_name=args.init, seed=args.seed, dtype=resolve_dtype(args.dtype))
        print(f"init {args.init} -> {folder}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), args.dtype], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["files_gib"] = round(sum(f.stat().st_size for f in folder.iterdir()) / 1024**3, 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
