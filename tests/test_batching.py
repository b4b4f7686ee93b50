"""classifier.batching: predictions asked for at once share forward passes, and each caller still
gets its own answer, or its own error."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from classifier import app_logic as logic
from classifier.batching import BatchingPredictor, MicroBatcher
from classifier.errors import ImageError
from classifier.predict import Predictor
from conftest import draw_shape


class SlowDoubler:
    """A run_batch that records its batches and holds the worker long enough for calls to pile up."""

    def __init__(self, fail_on=None):
        self.batches: list[list[int]] = []
        self.fail_on = fail_on
        self.started = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.set()
        time.sleep(0.2)
        if self.fail_on in items:
            raise ValueError(f"batch with {self.fail_on}")
        return [2 * item for item in items]


def test_calls_made_while_the_worker_is_busy_share_one_batch_and_get_their_own_results():
    run = SlowDoubler()
    batcher = MicroBatcher(run, max_batch=4)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(batcher, 0)
        run.started.wait(5)  # the worker is busy with 0: the next seven queue up behind it
        rest = [pool.submit(batcher, i) for i in range(1, 8)]
        time.sleep(0.05)
        results = [first.result(5)] + [f.result(5) for f in rest]
    assert results == [2 * i for i in range(8)]
    assert run.batches[0] == [0]  # a lone call does not wait for company
    assert [len(b) for b in run.batches[1:]] == [4, 3]  # then as many as are waiting, up to max_batch
    assert sorted(i for b in run.batches for i in b) == list(range(8))
    batcher.close()


def test_a_failing_batch_fails_its_own_callers_only():
    run = SlowDoubler(fail_on=3)
    batcher = MicroBatcher(run, max_batch=2)
    with pytest.raises(ValueError, match="batch with 3"):
        batcher(3)
    assert batcher(5) == 10  # the worker lives on
    batcher.close()


def test_close_ends_the_worker_and_refuses_new_calls():
    batcher = MicroBatcher(lambda items: items, max_batch=2)
    assert batcher(1) == 1
    batcher.close()
    batcher._worker.join(5)
    assert not batcher._worker.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        batcher(2)
    with pytest.raises(ValueError, match="at least 1"):
        MicroBatcher(lambda items: items, max_batch=0)


def test_batched_predictions_match_one_at_a_time_and_a_bad_file_fails_alone(tiny_bundle, tmp_path, one_torch_thread):
    predictor = Predictor(tiny_bundle)
    paths = []
    for i, kind in enumerate(["circle", "square", "triangle"] * 3):
        paths.append(tmp_path / f"{i}.png")
        draw_shape(kind).save(paths[-1])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    alone = [predictor.predict_scored(p) for p in paths]

    batched = BatchingPredictor(predictor, max_batch=4)
    with ThreadPoolExecutor(len(paths) + 1) as pool:
        bad = pool.submit(batched.predict_scored, broken)
        together = list(pool.map(batched.predict_scored, paths))
        with pytest.raises(ImageError):
            bad.result(30)
    for (probabilities, score), (expected, expected_score) in zip(together, alone):
        assert list(probabilities) == list(expected)  # the same ranking
        assert torch.allclose(torch.tensor(list(probabilities.values())), torch.tensor(list(expected.values())),
                              atol=1e-5)
        assert score == pytest.approx(expected_score, abs=1e-4)
    assert batched.labels == predictor.labels  # everything else is the predictor's own
    batched.close()


def test_the_app_store_batches_only_when_asked_and_closes_what_it_drops(tiny_bundle):
    assert not isinstance(logic.ModelStore({"m": str(tiny_bundle)}).get("m"), BatchingPredictor)
    store = logic.ModelStore({"m": str(tiny_bundle)}, max_batch=4)
    batched = store.get("m")
    assert isinstance(batched, BatchingPredictor) and store.bundle("m").label_names == batched.labels
    store.remove("m")
    batched._batcher._worker.join(5)
    assert not batched._batcher._worker.is_alive()


def test_onnx_predictions_batch_too():
    """The shipped CNN's model.onnx takes any batch size: batched answers match one at a time, and
    its score is NaN as unbatched (an ONNX graph ending in probabilities gives no energy)."""
    pytest.importorskip("onnxruntime")
    from classifier.serving import load_predictor

    predictor = load_predictor(logic.MODELS_DIR / "cifar10-cnn", "onnx", threads=1)
    photos = logic.example_images()[:6]
    batched = BatchingPredictor(predictor, max_batch=4)
    with ThreadPoolExecutor(len(photos)) as pool:
        together = list(pool.map(batched.predict_scored, photos))
    for (probabilities, score), photo in zip(together, photos):
        expected, _ = predictor.predict_scored(photo)
        assert list(probabilities) == list(expected)
        assert max(abs(probabilities[k] - expected[k]) for k in expected) < 1e-5
        assert score != score  # NaN
    batched.close()
