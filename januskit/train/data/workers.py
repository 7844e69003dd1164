"""A data source in a process of its own ([data] worker_processes = true): the child reads, decodes and
tokenises the source's samples ahead of the trainer, so the training process spends no time (and no GIL) on
them, and the kinds' sources (understanding, text, generation, edit) run side by side. With
worker_processes = N > 1 a file source (manifests or tar shards) runs in N processes (ParallelSource): each
walks the whole sequence of records but decodes only every N-th, and the trainer takes them in turn.

Exact, like the in-process path: a source's sequence does not depend on where it runs, and each sample comes
with the source's state after it, so state_dict() is the position after the last sample the trainer took,
not after the ones read ahead. load_state_dict restarts the child at the given position. A sample's error
(DataError in on_error = "raise" mode) is raised in the trainer with its message; a child that dies is
reported with its exit code.
"""
from __future__ import annotations

import copy
import queue
from collections import Counter
from typing import Any

import torch.multiprocessing as mp

_CTX = mp.get_context("spawn")  # not fork: the parent's OpenMP threads would deadlock a forked child's torch ops
_POLL_S = 1.0


def _put(out: Any, msg: tuple, stop: Any) -> None:
    """Put `msg` on the queue, waiting while it is full unless the trainer asks to stop."""
    while not stop.is_set():
        try:
            out.put(msg, timeout=_POLL_S)
            return
        except queue.Full:
            continue


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
            _put(out, ("item", item, source.state_dict()), stop)
    except Exception as e:  # noqa: BLE001 (any failure goes to the trainer, which raises it)
        out.put(("error", e))
    # Stay until the trainer is done with what was sent: the samples' tensors are shared through this process
    # (torch.multiprocessing hands over file descriptors), so leaving now would break the ones still queued.
    stop.wait()


def _serve_stride(source: Any, state: dict[str, Any], out: Any, stop: Any, workers: int, index: int) -> None:
    """A ParallelSource worker: walk the records from `state` (reading is cheap, decoding is not) and parse and
    transform only record k with k % workers == index (k counted from `state`); put ("item", k, sample, state
    after it) or ("bad", k, DataError, state after it), then ("end",) or ("error", exception)."""
    import torch

    from .records import DataError

    torch.set_num_threads(1)
    try:
        source.load_state_dict(state)
        source._check_empty = False  # this copy sees a share of the samples: the trainer's side counts them
        source._log_skips = index == 0  # every worker meets the same unreadable shards: one logs them
        k = 0
        while not stop.is_set():
            try:
                item = source._advance()
            except StopIteration:
                out.put(("end",))
                break
            if k % workers == index:
                try:
                    msg = ("item", k, source.transform(source._parse(item)), source.state_dict())
                except DataError as e:
                    msg = ("bad", k, e, source.state_dict())
                _put(out, msg, stop)
            k += 1
    except Exception as e:  # noqa: BLE001 (any failure goes to the trainer, which raises it)
        out.put(("error", e))
    stop.wait()  # as in _serve: the queued samples' tensors live in this process until the trainer is done


class ParallelSource:
    """Iterator over a file source's samples (ManifestSource, TarSource) decoded by `processes` children in turn:
    record k by child k % processes, each reading `ahead` of its own samples in advance. The same samples in
    the same order as the source in process, and the same state_dict: the children's positions are all the
    same after record k, and the counts that depend on every record (samples taken this epoch, samples skipped,
    an epoch that yielded nothing) are kept here, by the parent's copy of the source, as its own __next__ would."""

    def __init__(self, source: Any, processes: int, ahead: int = 32) -> None:
        from .records import _Source

        if not isinstance(source, _Source):
            raise ValueError(f"worker_processes = {processes}: more than one process per source needs a manifest or tar "
                             f"source, not {type(source).__name__}")
        if processes < 2 or ahead < 1:
            raise ValueError(f"ParallelSource needs processes >= 2 and ahead >= 1, got {processes} and {ahead}")
        self.inner, self.processes, self.ahead = source, processes, ahead  # inner: keeps the counts, never advanced
        self._state = copy.deepcopy(source.state_dict())
        self._procs: list[Any] = []
        self._decode_skips: Counter[str] = Counter()  # samples the children could not decode since they started
        self._start()

    def _start(self) -> None:
        self._k, self._ended = 0, False
        self._stop = _CTX.Event()
        self._queues = [_CTX.Queue(maxsize=self.ahead) for _ in range(self.processes)]
        self._procs = [_CTX.Process(target=_serve_stride, daemon=True, name=f"januskit-data-{type(self.inner).__name__}-{i}",
                                    args=(self.inner, self._state, q, self._stop, self.processes, i))
                       for i, q in enumerate(self._queues)]
        for proc in self._procs:
            proc.start()

    def __iter__(self) -> "ParallelSource":
        return self

    def _get(self) -> tuple:
        i = self._k % self.processes
        while True:
            try:
                return self._queues[i].get(timeout=_POLL_S)
            except queue.Empty:
                if not self._procs[i].is_alive():
                    raise RuntimeError(f"data process {i} of {type(self.inner).__name__} died (exit code "
                                       f"{self._procs[i].exitcode}) before record {self._k}") from None

    def __next__(self) -> Any:
        src = self.inner
        if self._ended:
            raise StopIteration
        while True:
            msg = self._get()
            if msg[0] in ("end", "error"):
                self.close()
                if msg[0] == "error":
                    raise msg[1]
                self._ended = True
                while True:  # as the source's own last _advance: an empty epoch raises, else the end of the last
                    src._end_epoch()
            kind, k, value, state = msg
            assert k == self._k, (k, self._k)  # a worker's records come in order
            self._k += 1
            while state["epoch"] > src.epoch:  # the records crossed into a new epoch: close the one behind
                src._end_epoch()
            if kind == "bad":
                if src.on_error == "raise":
                    raise value
                src._skip(value)
                self._decode_skips[value.reason] += 1
            else:
                src._good += 1
            # A child's counts hold the skips every child sees (unreadable shards) from its starting state; the
            # decoding skips since then are counted here.
            self._state = {**state, "good": src._good, "epoch": src.epoch,
                           "skipped": dict(Counter(state["skipped"]) + self._decode_skips)}
            if kind == "item":
                return value

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)  # checks it in the parent, and sets the epoch, good and skip counts
        self.close()
        self._state = copy.deepcopy(state)
        self._decode_skips = Counter()  # the children start from the state's counts
        self._start()

    def close(self) -> None:
        if not self._procs:
            return
        self._stop.set()
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for q in self._queues:
            q.close()
        self._procs = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass


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
