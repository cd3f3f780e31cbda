"""Dynamic batching: requests from many connections share one `model.generate` call.

A bounded queue feeds one worker thread (the model runs outside the event loop; torch releases the GIL).
The worker takes the first waiting request, keeps collecting for up to `max_wait_ms` or until
`max_batch_size` rows (a request with `n` choices is `n` rows), groups what it got by sampling settings
(`SamplingParams.batch_key`: all greedy requests together, sampled ones by temperature and top-p, seeded
sampled ones alone) and runs one `Engine.generate` per group. A full queue refuses new requests at once
(`QueueFull`; the server turns it into 503 with `Retry-After`) instead of growing without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from gpt2mm.serve.engine import Engine, GenerationRequest

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The request queue is full: try again later."""


class Batcher:
    """Owns the worker thread that runs the engine; `submit` is safe from any thread."""

    def __init__(
        self, engine: Engine, max_batch_size: int = 16, max_wait_ms: float = 10.0, max_queue: int = 256
    ):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: queue.Queue[GenerationRequest] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def queue_size(self) -> int:
        return self._queue.qsize()

    @property
    def full(self) -> bool:
        """The queue is at its limit now: a request arriving now is refused before it is read."""
        return self._queue.full()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        with self._start_lock:
            if self.running:
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="gpt2mm-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker after its current batch; requests still queued are failed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        while True:
            try:
                self._queue.get_nowait().finish(RuntimeError("the server is shutting down"))
            except queue.Empty:
                break

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; raises `QueueFull` when the queue is at its limit."""
        if request.params.n > self.max_batch_size:
            raise ValueError(f"n={request.params.n} is over the batch size {self.max_batch_size}")
        self.start()
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise QueueFull("the request queue is full") from None

    def _collect(self) -> list[GenerationRequest]:
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch, rows = [first], first.params.n
        deadline = time.monotonic() + self.max_wait_s
        while rows < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            batch.append(item)
            rows += item.params.n
        return batch

    def _groups(self, batch: list[GenerationRequest]) -> list[list[GenerationRequest]]:
        """Compatible sampling settings together, in arrival order, at most `max_batch_size` rows each."""
        by_key: dict[object, list[list[GenerationRequest]]] = {}
        for r in batch:
            key = r.params.batch_key()
            key = key if key is not None else ("alone", id(r))
            groups = by_key.setdefault(key, [[]])
            if groups[-1] and sum(x.params.n for x in groups[-1]) + r.params.n > self.max_batch_size:
                groups.append([])
            groups[-1].append(r)
        return [g for gs in by_key.values() for g in gs]

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            for group in self._groups(batch):
                try:
                    self.engine.generate(group)
                except BaseException as e:  # the engine fails requests itself; this is the last resort
                    log.exception("generation failed")
                    for r in group:
                        if r.error is None and not all(c.finish_reason for c in r.choices):
                            r.finish(e)
