"""Predictions asked for at the same time share one forward pass: a micro-batcher for serving.

When several people classify at once, each request used to run its own one-image forward pass. A
forward pass over a batch costs less per image than the same images one by one (the shipped lite0
on one CPU thread: 22-24 ms per image in a batch of 8 against 28 ms alone), so under load the app
spends less CPU per request: with 50 clients, 38 ms of server CPU against 52-57 ms, and 10-23% more
requests a second (benchmarks/results/app_latency_cpu.md).

Written here rather than taken from Gradio's `batch=True`, because that hands the event function
lists of every input and fails the whole batch when one of them raises: one hostile upload would
take down the answers of everybody batched with it. Here each request decodes its own image in its
own thread (a bad file fails that request alone, with its own message), and only the forward pass
of the images that decoded is shared. Nothing waits for a batch to fill: a request that finds the
model idle runs at once, alone, and the ones arriving while it runs form the next batch, so a lone
user pays nothing for batching.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Generic, Sequence, TypeVar

from classifier.images import ImageSource

Item = TypeVar("Item")
Result = TypeVar("Result")

_STOP = object()  # put on the queue by close()
# Past 8 images a batch stopped paying on this 2-core CPU (lite0, one thread: 20.7 ms per image in a
# batch of 8, 24.5 in a batch of 16), and a bigger one makes its first image wait longer.
DEFAULT_MAX_BATCH = 8


class MicroBatcher(Generic[Item, Result]):
    """`batcher(item)` from any number of threads: `run_batch` runs in one worker thread on up to
    `max_batch` items at a time (all those waiting when it becomes free), and each caller gets its
    own item's result back, or the exception that its batch raised."""

    def __init__(self, run_batch: Callable[[list[Item]], Sequence[Result]], max_batch: int = DEFAULT_MAX_BATCH,
                 name: str = "micro-batcher"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.run_batch, self.max_batch = run_batch, max_batch
        self._waiting: queue.SimpleQueue = queue.SimpleQueue()  # (item, Future) pairs, then _STOP
        self._closed, self._lock = False, threading.Lock()
        # A daemon: a serving process that exits does not wait for it.
        self._worker = threading.Thread(target=self._work, name=name, daemon=True)
        self._worker.start()

    def __call__(self, item: Item) -> Result:
        future: Future = Future()
        with self._lock:  # nothing is queued behind close()'s stop, where no worker would take it
            if self._closed:
                raise RuntimeError("this micro-batcher is closed")
            self._waiting.put((item, future))
        return future.result()

    def close(self) -> None:
        """Ends the worker thread once the work already queued is done."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._waiting.put(_STOP)

    def _take_batch(self) -> tuple[list[tuple[Item, Future]], bool]:
        """(the next batch, whether close() was called): all that is waiting, up to max_batch."""
        batch, first = [], self._waiting.get()  # sleeps until there is work
        while first is not _STOP:
            batch.append(first)
            if len(batch) == self.max_batch:
                break
            try:
                first = self._waiting.get_nowait()
            except queue.Empty:
                break
        return batch, first is _STOP

    def _work(self) -> None:
        stopped = False
        while not stopped:
            batch, stopped = self._take_batch()
            if not batch:
                continue
            try:
                results = self.run_batch([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch gave {len(results)} results for {len(batch)} items")
            except BaseException as exc:  # the callers are waiting: they, not this thread, report it
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results):
                future.set_result(result)


class BatchingPredictor:
    """A predictor (Predictor or OnnxPredictor) whose predict_scored calls, made from many serving
    threads at once, share forward passes. Everything else (explain, labels, bundle) is the
    wrapped predictor's own."""

    def __init__(self, predictor, max_batch: int = DEFAULT_MAX_BATCH):
        self.predictor = predictor
        self._batcher = MicroBatcher(self._forward, max_batch)

    def _forward(self, images: list) -> list[tuple[Any, float]]:
        probabilities, scores = self.predictor.scored_probabilities(self.predictor.stack(images))
        return list(zip(probabilities, (float(s) for s in scores)))

    def predict_scored(self, image: ImageSource, top_k: int | None = None) -> tuple[dict[str, float], float]:
        """As Predictor.predict_scored: the image is decoded here, in the caller's thread (so a bad
        file raises ImageError for this caller alone), and joins the next shared forward pass."""
        probabilities, score = self._batcher(self.predictor.preprocess(image))
        return self.predictor.top_classes(probabilities, top_k), score

    def close(self) -> None:
        self._batcher.close()

    def __getattr__(self, name: str):
        return getattr(self.predictor, name)
