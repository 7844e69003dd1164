"""Peak memory and time of loading a checkpoint folder, measured in a fresh process.

    python bench/load_memory.py /tmp/janus-pro-7b --init janus-pro-7b --dtype bfloat16
    python bench/load_memory.py /tmp/janus-pro-7b --dtype bfloat16 --quantize int4 [--group-size 128]

With --init PRESET a random-weight folder of that preset is written first (bf16 for the 7B: 15 GB on
disk) when the folder does not exist yet. The load runs in a child process so its peak RSS
(ru_maxrss) is the loader's own; the claim to check is that a 7B folder loads in bf16 within 24 GiB,
i.e. with no second full copy of the weights. Tensors kept as stored are mapped from the file and only
count once read, so after loading every weight is read once (a sum), as inference does:
load_peak_rss_gib is the peak before that, peak_rss_gib the peak of the whole run. With --quantize the folder is quantised while loading
(januskit.quantization), or a folder written by `januskit quantize` is loaded as it is: the claims
are 6 GB (int4) and 10 GB (int8) peak for the 7B. weights_gib counts parameters and buffers (the
quantised weights are buffers).
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
quantize = None if sys.argv[3] == "none" else sys.argv[3]
pipe = januskit.load(sys.argv[1], dtype=sys.argv[2], quantize=quantize, group_size=int(sys.argv[4]))
secs = time.perf_counter() - t
load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
tensors = [*pipe.model.parameters(), *pipe.model.buffers()]
for x in tensors:  # read every weight once, as inference does: mapped pages count only once touched
    for chunk in x.detach().reshape(-1).split(1 << 24):
        chunk.sum()
print(json.dumps(dict(seconds=round(secs, 1), parameters=sum(p.numel() for p in pipe.model.parameters()),
    load_peak_rss_gib=round(load_peak, 2),
    peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
    weights_gib=round(sum(p.numel() * p.element_size() for p in tensors) / 1024**3, 2))))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--init", default=None, help="preset to write first if the folder is missing")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quantize", default=None, choices=["int8", "int4"], help="quantise while loading")
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size")
    args = ap.parse_args()
    folder = Path(args.folder)
    if args.init and not folder.exists():
        from januskit import resolve_dtype
        from januskit.checkpoint.init import init_checkpoint

        t = time.perf_counter()
        init_checkpoint(folder, preset_name=args.init, seed=args.seed, dtype=resolve_dtype(args.dtype))
        print(f"init {args.init} -> {folder}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), args.dtype, args.quantize or "none",
                          str(args.group_size)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["files_gib"] = round(sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1024**3, 2)
    res.update(dtype=args.dtype, quantize=args.quantize, group_size=args.group_size if args.quantize == "int4" else None)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
