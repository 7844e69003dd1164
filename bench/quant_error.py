"""Error of weight-only int8 / int4 quantisation against bfloat16, at Janus-Pro-1B widths.

Random weights (januskit's init: std 1/sqrt(fan_in), so activations keep their scale) with the real
LLM and head widths (dim 2048, SwiGLU 5632, vocab 102400, gen head 2048 -> 2048 -> 16384) and only
`--layers` decoder layers (bench_image_decode.bench_config). For each method: the relative L2 error of
the text-head and image-head logits of one LLM forward over random token ids, and how often the
argmax agrees with bfloat16; plus, per Linear shape, the error of one layer alone. The bf16 row
against float32 gives the scale of bfloat16's own rounding.

    python bench/quant_error.py                      # 4 layers, 2 seeds, 64 positions
    python bench/quant_error.py --layers 2 --seeds 1 --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import warnings

import torch

from bench_image_decode import bench_config
from januskit.checkpoint.init import random_model
from januskit.quantization import quantize_model
from januskit.quantization.codec import quantize
from januskit.quantization.qlinear import from_parts
from januskit.quantization.spec import QuantSpec

METHODS = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]


def logits(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        h = model.llm(model.text_embeds(ids), pos)
        return model.text_logits(h).float(), model.image_logits(h).float()


def compare(q: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"rel_err": round(float((q - ref).norm() / ref.norm()), 4),
            "top1": round(float((q.argmax(-1) == ref.argmax(-1)).float().mean()), 3)}


def layer_errors(seed: int) -> list[dict]:
    """One Linear of each LLM shape at 1B width: output error against the bf16 layer."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n, k in [(2048, 2048), (5632, 2048), (2048, 5632)]:
        w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
        x = torch.randn(64, k, generator=g).bfloat16()
        ref = (x @ w.t()).float()
        for method, gs in METHODS:
            lin = from_parts(QuantSpec(method, gs, ("x",)), quantize(w, method, gs), None, torch.bfloat16)
            with torch.inference_mode():
                rows.append({"shape": f"{n}x{k}", "method": method, "group_size": gs,
                             "rel_err": compare(lin(x).float(), ref)["rel_err"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--positions", type=int, default=64, help="token positions (2 rows of positions/2)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    c = bench_config(args.layers, 384)
    rows = []
    for seed in range(args.seeds):
        ids = torch.randint(0, c.llm.vocab_size, (2, args.positions // 2), generator=torch.Generator().manual_seed(seed))
        ref_model = random_model(c, seed, torch.bfloat16)
        ref = logits(ref_model, ids)
        f32 = logits(random_model(c, seed, torch.float32), ids)
        rows.append({"seed": seed, "method": "bf16 vs fp32", "group_size": None,
                     "text": compare(ref[0], f32[0]), "image": compare(ref[1], f32[1])})
        for method, gs in METHODS:
            m = copy.deepcopy(ref_model)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # every layer must be quantised at these widths
                quantize_model(m, method, gs, strict=True)
            q = logits(m, ids)
            rows.append({"seed": seed, "method": method, "group_size": gs,
                         "text": compare(q[0], ref[0]), "image": compare(q[1], ref[1])})
            del m
        del ref_model
    for r in rows:
        print(json.dumps(r))
    per_layer = layer_errors(0)
    for r in per_layer:
        print(json.dumps(r))
    print(f"\n| method | text logits rel. err | text top-1 agree | image logits rel. err | image top-1 agree |"
          f"  ({args.layers} layers, {args.seeds} seeds, mean)\n|---|---|---|---|---|")
    for method, gs in [("bf16 vs fp32", None)] + METHODS:
        sel = [r for r in rows if r["method"] == method and r["group_size"] == gs]
        mean = {f"{p}_{m}": sum(r[p][m] for r in sel) / len(sel) for p in ("text", "image") for m in ("rel_err", "top1")}
        name = method + (f" g{gs}" if gs else "")
        print(f"| {name} | {mean['text_rel_err']:.4f} | {mean['text_top1']:.3f} | {mean['image_rel_err']:.4f} | "
              f"{mean['image_top1']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {"layers": args.layers, "seeds": args.seeds, "positions": args.positions},
                       "logits": rows, "per_layer": per_layer}, f, indent=1)


if __name__ == "__main__":
    main()
