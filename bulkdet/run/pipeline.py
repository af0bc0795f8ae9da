"""Stages run by threads, connected by bounded queues, stopped cleanly.

Each stage is a function that fills in its part of an item (a batch travelling through
the stages). A stage may have several workers (ONNX Runtime releases the GIL, so two
inference calls use two cores); their results are handed on in the order the items came
in, so the last stage (the writer) sees batches in plan order.

Memory is bounded: an item is either in a queue (at most `queue_size` per queue), being
worked on (one per worker), or waiting for an earlier item to be handed on (fewer than the
stage's workers). See docs/performance.md.

Shutdown: the first exception in any stage, or a stop request (Ctrl-C in the main
thread), sets `stop`; every thread waits on its queues with a timeout and checks it, so
all of them end within one item's work. `run` returns only after every thread has ended,
so the caller can then close the output knowing that no stage is still writing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("bulkdet")
QUEUE_SIZE = 2  # items waiting between two stages: enough to overlap, bounded memory
_POLL_S = 0.1
_END = object()


@dataclass
class Stage:
    name: str
    fn: object  # callable(item) -> None; fills in the item
    workers: int = 1


@dataclass
class _Handoff:
    """Puts a stage's results on its output queue in input order (a small reorder buffer)."""

    workers: int
    next_seq: int = 0
    pending: dict = field(default_factory=dict)
    lock: threading.Condition = field(default_factory=threading.Condition)
    alive: int = 0


class StagePipeline:
    """Runs items through stages: `StagePipeline(stages, on_done).run(items)`.

    `stages`: Stage objects or (name, fn) / (name, fn, workers) tuples. `on_done(item)` is
    called, in order, after the last stage. Items must have a `times` attribute with
    `start`, `end` and `queue_depth` dicts (metrics.BatchTimes), or none at all.
    """

    def __init__(self, stages, on_done=None, queue_size: int = QUEUE_SIZE):
        self.stages = [s if isinstance(s, Stage) else Stage(*s) for s in stages]
        self.on_done = on_done
        self.queues = [queue.Queue(queue_size) for _ in self.stages]
        self.handoffs = [_Handoff(s.workers) for s in self.stages]
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    # -- queues that give up when asked to stop
    def _put(self, q: queue.Queue, item) -> bool:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue):
        while not self.stop.is_set():
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return _END

    # -- one worker thread of one stage
    def _hand_on(self, index: int, seq: int, item) -> bool:
        """Queue `item` for the next stage once every earlier item has gone."""
        h = self.handoffs[index]
        outq = self.queues[index + 1] if index + 1 < len(self.stages) else None
        with h.lock:
            h.pending[seq] = item
            while h.next_seq in h.pending:
                ready = h.pending.pop(h.next_seq)
                if outq is None:
                    if self.on_done:
                        self.on_done(ready)
                elif not self._put(outq, (h.next_seq, ready)):
                    return False
                h.next_seq += 1
            h.lock.notify_all()
        return True

    def _wait_turn(self, index: int) -> None:
        """Do not run ahead: at most `workers` items of a stage wait for an earlier one."""
        h = self.handoffs[index]
        with h.lock:
            while len(h.pending) >= h.workers and not self.stop.is_set():
                h.lock.wait(_POLL_S)

    def _worker(self, index: int) -> None:
        stage, inq = self.stages[index], self.queues[index]
        try:
            while True:
                self._wait_turn(index)
                got = self._get(inq)
                if got is _END:
                    if not self.stop.is_set():
                        inq.put(_END)  # for this stage's other workers
                    break
                seq, item = got
                times = getattr(item, "times", None)
                if times is not None:
                    times.queue_depth[stage.name] = inq.qsize()
                    times.start[stage.name] = time.perf_counter()
                stage.fn(item)
                if times is not None:
                    times.end[stage.name] = time.perf_counter()
                if not self._hand_on(index, seq, item):
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the caller of run()
            log.debug("stage %s failed", stage.name, exc_info=True)
            self.errors.append(exc)
            self.stop.set()
        finally:
            self._worker_done(index)

    def _worker_done(self, index: int) -> None:
        h = self.handoffs[index]
        with h.lock:
            h.alive -= 1
            last = h.alive == 0
        if last and index + 1 < len(self.stages) and not self.stop.is_set():
            self._put(self.queues[index + 1], _END)

    # -- the caller's side
    def run(self, items) -> None:
        """Feed items in; return when all are through. Raises the first stage error, or
        KeyboardInterrupt after a stop on Ctrl-C, once every thread has ended."""
        threads = []
        for i, stage in enumerate(self.stages):
            self.handoffs[i].alive = stage.workers
            threads += [threading.Thread(target=self._worker, args=(i,), daemon=True,
                                         name=f"bulkdet-{stage.name}-{w}") for w in range(stage.workers)]
        for t in threads:
            t.start()
        try:
            for seq, item in enumerate(items):
                if not self._put(self.queues[0], (seq, item)):
                    break
            self._put(self.queues[0], _END)
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.2)
        except KeyboardInterrupt:
            self.stop.set()
            log.warning("interrupted: finishing the batches in flight, then committing what is complete")
            self._join(threads)
            raise
        except BaseException:  # the items themselves failed: stop the stages before raising
            self.stop.set()
            self._join(threads)
            raise
        if self.errors:
            raise self.errors[0]

    def _join(self, threads) -> None:
        """Wait for every thread, even through further Ctrl-C: each ends within one item."""
        for t in threads:
            while t.is_alive():
                try:
                    t.join(timeout=0.2)
                except KeyboardInterrupt:
                    log.warning("still stopping: a stage is finishing its current batch")
