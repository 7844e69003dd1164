"""What every benchmark run shares: shards across ranks, answers appended as JSONL (a rerun skips what is
done; a killed run loses at most the batch in flight), batched greedy answering with a progress bar,
a summary JSON and a Markdown table with the papers' figures beside ours.

Under torchrun each rank takes every world-th item (by position in the benchmark's own order), writes
`answers.rank<r>.jsonl`, and rank 0 merges all ranks' files after a barrier and scores."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The Janus authors' short-answer instruction (LLaVA-1.5's), appended to POPE, MME and GQA questions.
SHORT_ANSWER = "Answer the question using a single word or phrase."


class BenchmarkDataError(ValueError):
    """A benchmark file is missing or malformed; the message names the file and what the release has."""


@dataclass
class Item:
    """One question: a stable id (the benchmark's own), the image (a path, or the bytes of an image the
    benchmark embeds), the prompt as sent, and whatever the scorer needs (label, answer, subtask, ...)."""

    id: str
    image: Path | bytes
    prompt: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunOptions:
    out: Path
    batch: int = 8
    limit: int | None = None
    max_new_tokens: int = 16
    system_prompt: str | None = ""  # "" = no system prompt (the authors' evaluation); None = the processor's
    progress: bool = True


def rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard(items: Sequence[Item], rank: int, world: int) -> list[Item]:
    return list(items[rank::world])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete lines only: a run killed mid-write leaves a truncated last line, which is dropped (its
    item is answered again)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _append(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append whole lines and sync them. After a kill mid-line the file ends without a newline: start a
    new line, so the first new record is not glued to the cut one."""
    cut = False
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            cut = fh.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as fh:
        if cut:
            fh.write("\n")
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def barrier(world: int) -> None:
    if world == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()


def answer_items(answer_batch: Callable[[list[Item]], list[str]], items: Sequence[Item], opts: RunOptions,
                 name: str) -> dict[str, str] | None:
    """Answer this rank's share of `items` (skipping ids already in its file) in batches, then, on rank 0,
    return every rank's answers by id; other ranks return None."""
    rank, world = rank_world()
    opts.out.mkdir(parents=True, exist_ok=True)
    items = list(items)[: opts.limit] if opts.limit else list(items)
    mine = shard(items, rank, world)
    path = opts.out / f"answers.rank{rank}.jsonl"
    done = {r["id"] for r in read_jsonl(path)}
    todo = [it for it in mine if it.id not in done]
    bar = None
    if opts.progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"{name} rank {rank}", unit="q")
    for i in range(0, len(todo), opts.batch):
        chunk = todo[i:i + opts.batch]
        answers = answer_batch(chunk)
        _append(path, ({"id": it.id, "answer": a} for it, a in zip(chunk, answers, strict=True)))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    barrier(world)
    if rank != 0:
        return None
    merged: dict[str, str] = {}
    for r in range(world):
        for row in read_jsonl(opts.out / f"answers.rank{r}.jsonl"):
            merged[row["id"]] = row["answer"]
    missing = [it.id for it in items if it.id not in merged]
    if missing:
        raise RuntimeError(f"{name}: {len(missing)} item(s) have no answer after the merge (first: {missing[0]}); "
                           f"rerun the same command to answer them")
    return merged


def generate_sets(pipe, prompts: Sequence[str], n: int, done: Callable[[int], bool],
                  save: Callable[[int, list[Any]], None], *, seed: int = 0, batch: int = 64, name: str = "generate",
                  progress: bool = True, on_batch: Callable[[Any], None] | None = None, **options: Any) -> None:
    """n images for each of this rank's prompts (every world-th, by position) not yet `done(i)`, in batches
    of about `batch` images across prompts; `save(i, images)` gets prompt i's n PIL images once they are
    all sampled (a killed run redoes at most the batch in flight). Image k of prompt i is sampled with
    generator (seed, i * n + k) alone: the same image whatever the batch, the rank count or a resume.
    `on_batch(ImageBatch)` sees each batch (its info: llm_forwards, ...). `options`: generate_batch's."""
    from ..sampling.logits import row_generator

    if n < 1:
        raise ValueError(f"images per prompt must be >= 1, got {n}")
    rank, world = rank_world()
    mine = [i for i in range(len(prompts)) if i % world == rank]
    todo = [i for i in mine if not done(i)]
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(mine) * n, initial=(len(mine) - len(todo)) * n, desc=f"{name} rank {rank}", unit="img")
    per = max(1, batch // n)  # prompts per batch
    for c in range(0, len(todo), per):
        chunk = todo[c:c + per]
        ids = {i: pipe.processor.generation_prompt(prompts[i]) for i in chunk}
        out = pipe.generate_batch([ids[i] for i in chunk for _ in range(n)],
                                  generators=[row_generator(seed, i * n + k) for i in chunk for k in range(n)], **options)
        images = out.pil()
        for j, i in enumerate(chunk):
            save(i, images[j * n:(j + 1) * n])
        if on_batch is not None:
            on_batch(out)
        if bar is not None:
            bar.update(len(chunk) * n)
    if bar is not None:
        bar.close()


def chat_answerer(pipe, opts: RunOptions) -> Callable[[list[Item]], list[str]]:
    """Greedy answers from a januskit pipeline, one left-padded batch per call."""
    from ..processing.image import load_image

    def run(chunk: list[Item]) -> list[str]:
        images = [[load_image(it.image)] for it in chunk]
        return [a.strip() for a in pipe.chat_batch([it.prompt for it in chunk], images, max_new_tokens=opts.max_new_tokens,
                                                   temperature=0.0, system_prompt=opts.system_prompt)]
    return run


# -- the papers' figures ----------------------------------------------------------------------------------
# Janus (arXiv 2410.13848) Tables 2-4, Janus-Pro (2501.17811) Tables 3-5, JanusFlow (2411.07975) Tables 2, 3, 5,
# as collected in the reference fact sheet. MME: the perception total (MME-P). GenEval: overall, 0-1.
PAPERS: dict[str, dict[str, float]] = {
    "Janus-1.3B": {"pope": 87.0, "mme": 1338.0, "mmbench": 69.4, "gqa": 59.1, "geneval": 0.61, "dpg": 79.68},
    "JanusFlow-1.3B": {"pope": 88.0, "mme": 1333.1, "mmbench": 74.9, "gqa": 60.3, "geneval": 0.63, "dpg": 80.09},
    "Janus-Pro-1B": {"pope": 86.2, "mme": 1444.0, "mmbench": 75.5, "gqa": 59.3, "geneval": 0.73, "dpg": 82.63},
    "Janus-Pro-7B": {"pope": 87.4, "mme": 1567.1, "mmbench": 79.2, "gqa": 62.0, "geneval": 0.80, "dpg": 84.19},
}


def known_release(model: str | Path | None) -> str | None:
    """The release a model folder is, by its name (Janus-Pro-7B, janus_pro_1b, ...); None for anything else."""
    if model is None:
        return None
    name = Path(str(model)).name.lower().replace("_", "-")
    for release in PAPERS:
        if release.lower() in name:
            return release
    return None


def write_summary(out: Path, bench: str, summary: dict[str, Any], headline: float, rows: list[tuple[str, Any]],
                  release: str | None) -> str:
    """summary.json and summary.md in `out`; returns the Markdown. `headline` is the figure the papers
    report, on their scale; `rows` the table's other lines."""
    paper = PAPERS.get(release or "", {}).get(bench)
    summary = dict(summary, benchmark=bench, headline=headline, release=release, paper=paper)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [f"| {bench} | ours | paper ({release}) |" if paper is not None else f"| {bench} | ours |",
             "|---|---|---|" if paper is not None else "|---|---|"]
    lines.append(f"| **headline** | **{_fmt(headline)}** | {_fmt(paper)} |" if paper is not None
                 else f"| **headline** | **{_fmt(headline)}** |")
    for k, v in rows:
        lines.append(f"| {k} | {_fmt(v)} |" + (" |" if paper is not None else ""))
    md = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(md)
    return md


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)
