"""A data source in a process of its own ([data] worker_processes = true): the child reads, decodes and
tokenises the source's samples ahead of the trainer, so the training process spends no time (and no GIL) on
them, and the kinds' sources (understanding, text, generation, edit) run side by side.

Exact, like the in-process path: a source's sequence does not depend on where it runs, and each sample comes
with the source's state after it, so state_dict() is the position after the last sample the trainer took,
not after the ones read ahead. load_state_dict restarts the child at the given position. A sample's error
(DataError in on_error = "raise" mode) is raised in the trainer with its message; a child that dies is
reported with its exit code.
"""
from __future__ import annotations

import copy
import queue
from typing import Any

import torch.multiprocessing as mp

_CTX = mp.get_context("spawn")  # not fork: the parent's OpenMP threads would deadlock a forked child's torch ops
_POLL_S = 1.0


def _serve(source: Any, state: dict[str, Any], out: Any, stop: Any) -> None:
    """The child: from `state`, put ("item", sample, state after it) for every sample, then ("end",) or
    ("error", exception); stop when asked."""
    import torch

    torch.set_num_threads(1)  # the trainer has the cores
    try:
        source.load_state_dict(state)
        while not stop.is_set():
            try:
                item = next(source)
            except StopIteration:
                out.put(("end",))
                break
            msg = ("item", item, source.state_dict())
            while not stop.is_set():
                try:
                    out.put(msg, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
    except Exception as e:  # noqa: BLE001 (any failure goes to the trainer, which raises it)
        out.put(("error", e))
    # Stay until the trainer is done with what was sent: the samples' tensors are shared through this process
    # (torch.multiprocessing hands over file descriptors), so leaving now would break the ones still queued.
    stop.wait()


class SourceProcess:
    """Iterator over `source`'s samples, read `ahead` samples in advance by a child process (spawned with a
    pickled copy of the source at its current state)."""

    def __init__(self, source: Any, ahead: int = 32) -> None:
        if ahead < 1:
            raise ValueError(f"ahead must be >= 1, got {ahead}")
        self.inner, self.ahead = source, ahead  # the parent's copy: pickled for the child, never advanced
        self._state = copy.deepcopy(source.state_dict())
        self._proc = None
        self._start()

    def _start(self) -> None:
        self._queue = _CTX.Queue(maxsize=self.ahead)
        self._stop = _CTX.Event()
        self._proc = _CTX.Process(target=_serve, args=(self.inner, self._state, self._queue, self._stop), daemon=True,
                                  name=f"januskit-data-{type(self.inner).__name__}")
        self._proc.start()

    def __iter__(self) -> "SourceProcess":
        return self

    def __next__(self) -> Any:
        while True:
            try:
                msg = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._proc.is_alive():
                    raise RuntimeError(f"the data process of {type(self.inner).__name__} died (exit code "
                                       f"{self._proc.exitcode}) before its next sample") from None
        if msg[0] == "item":
            self._state = msg[2]
            return msg[1]
        self.close()
        if msg[0] == "end":
            raise StopIteration
        raise msg[1]

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)  # checks it in the parent, so a mismatch raises here with its message
        self.close()
        self._state = copy.deepcopy(state)
        self._start()

    def close(self) -> None:
        if self._proc is None:
            return
        self._stop.set()
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join()
        self._queue.close()
        self._proc = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass
