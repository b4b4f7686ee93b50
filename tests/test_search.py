"""Hyperparameter search: the space, real trials, pruning, resuming, the table and retraining."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from classifier import search
from classifier.cli import search as search_cli
from classifier.config import RunConfig
from classifier.search import (SearchConfig, SearchError, grid_points, load_records, parse_param, parse_space,
                               results_markdown, run_search, trial_config)
from classifier.errors import TrainingDiverged


def _config(folder: Path, out: Path, space: list[str], **kwargs) -> SearchConfig:
    base = RunConfig(data=str(folder), model="configurable_cnn", epochs=2, batch_size=16, patience=2,
                     workers=0, lr=0.05, mistakes=0)
    return SearchConfig(base=base, space=parse_space(space), out=out, **kwargs)


class FakeFit:
    """Stands in for train.fit: reports the validation losses a test chooses, one per epoch.

    `losses(lr, model)` gives the curve of a trial; `interrupt_at` raises KeyboardInterrupt on that
    call, as Ctrl-C would mid-trial.
    """

    def __init__(self, losses, interrupt_at: int | None = None, diverge: set | None = None):
        self.losses, self.interrupt_at, self.diverge = losses, interrupt_at, diverge or set()
        self.calls: list[dict] = []

    def __call__(self, model, train_loader, val_loader, config, out, *, device=None, on_epoch_end=None, **_):
        self.calls.append({"lr": config.lr, "out": Path(out)})
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        if config.lr in self.diverge:
            raise TrainingDiverged("loss became NaN")
        for epoch, loss in enumerate(self.losses(config.lr, model)[:config.epochs], start=1):
            on_epoch_end({"epoch": epoch, "val_loss": loss, "val_acc": 1 - loss / 3, "train_loss": loss,
                          "train_acc": 0.5, "seconds": 0.01})


# ----------------------------------------------------------------------------------------------
# The space


def test_values_and_ranges_are_parsed():
    assert parse_param("c1=16,32").choices == [16, 32]
    assert parse_param("lr=0.01,1e-3").choices == [0.01, 0.001]
    assert parse_param("optimizer=sgd,adamw").choices == ["sgd", "adamw"]
    assert parse_param("nesterov=true,false").choices == [True, False]
    ranged = parse_param("lr=1e-4..0.1:log")
    assert ranged.is_range and ranged.log and ranged.low == 1e-4 and ranged.high == 0.1
    assert isinstance(parse_param("c1=8..64").low, int)
    assert parse_param("batch-size=64,128").name == "batch_size"


@pytest.mark.parametrize("spec, message", [
    ("c1", "name=v1,v2"), ("lr=0.1..0.01", "low < high"), ("lr=0..1:log", "above zero"),
    ("lr=1..2:sqrt", "only scale"), ("c1=16,16", "listed twice"), ("epochs=3,5", "trial-epochs"),
    ("data=a,b", "same data"),
])
def test_bad_parameters_are_explained(spec, message):
    with pytest.raises(SearchError, match=message):
        parse_param(spec)


def test_grid_is_every_combination_and_refuses_ranges():
    points = grid_points(parse_space(["c1=16,32", "l1=128,256", "lr=0.01,0.05"]))
    assert len(points) == 8 and len({tuple(p.values()) for p in points}) == 8
    assert points[0] == {"c1": 16, "l1": 128, "lr": 0.01}
    with pytest.raises(SearchError, match="--sampler tpe"):
        grid_points(parse_space(["lr=1e-3..1e-1:log"]))


def test_trial_parameters_go_to_the_run_or_to_the_model():
    base = RunConfig(model="configurable_cnn", model_args={"l2": 42})
    cfg = trial_config(base, {"lr": 0.05, "batch_size": 64, "c1": 32}, Path("runs/t"))
    assert cfg.lr == 0.05 and cfg.batch_size == 64 and cfg.out == "runs/t"
    assert cfg.model_args == {"l2": 42, "c1": 32}
    assert base.model_args == {"l2": 42}, "the base config is not modified"


# ----------------------------------------------------------------------------------------------
# Running


def test_real_grid_search_writes_a_ranked_table(image_folder, tmp_path):
    out = tmp_path / "search"
    config = _config(image_folder, out, ["c1=4,8", "lr=0.01,0.1"], prune=False)
    config.base.epochs = 1
    finished = []
    records = run_search(config, on_trial_end=finished.append)
    assert len(records) == len(finished) == 4
    assert {(r.params["c1"], r.params["lr"]) for r in records} == {(4, 0.01), (4, 0.1), (8, 0.01), (8, 0.1)}
    assert all(r.outcome == "complete" and r.epochs == 1 and r.seconds > 0 for r in records)
    assert all(0 <= r.val_acc <= 1 and r.val_loss > 0 for r in records)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_loss"]) for r in rows] == sorted(float(r["val_loss"]) for r in rows)
    assert list(rows[0])[:4] == ["rank", "trial", "c1", "lr"]
    assert (out / "results.md").read_text().startswith("| rank | trial | c1 | lr | val_loss")
    # each trial's curve is kept; its weights are not (the winner is retrained in full)
    assert (out / "trials" / "0000" / "metrics.jsonl").exists()
    assert not (out / "trials" / "0000" / "last.pt").exists()


def test_interrupted_search_resumes_without_redoing_finished_trials(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "search"
    space = ["c1=4,8", "lr=0.01,0.02,0.03"]
    curve = lambda lr, _: [1.0 - lr, 0.9 - lr]  # noqa: E731
    first = FakeFit(curve, interrupt_at=3)
    monkeypatch.setattr(search, "fit", first)
    with pytest.raises(KeyboardInterrupt):
        run_search(_config(image_folder, out, space, prune=False))
    stored = load_records(out)
    assert [r.outcome for r in stored] == ["complete", "complete", "failed"]
    done = {(r.params["c1"], r.params["lr"]) for r in stored if r.outcome == "complete"}

    second = FakeFit(curve)
    monkeypatch.setattr(search, "fit", second)
    records = run_search(_config(image_folder, out, space, prune=False))
    assert len(second.calls) == 4, "two finished trials are skipped, the interrupted one is run again"
    complete = [r for r in records if r.outcome == "complete"]
    assert len({(r.params["c1"], r.params["lr"]) for r in complete}) == 6
    assert done <= {(r.params["c1"], r.params["lr"]) for r in complete}

    third = FakeFit(curve)
    monkeypatch.setattr(search, "fit", third)
    run_search(_config(image_folder, out, space, prune=False))
    assert third.calls == [], "a finished search runs nothing"


def test_a_trial_left_running_by_a_killed_process_is_run_again(image_folder, tmp_path, monkeypatch):
    """kill -9 leaves a trial 'running' in the storage; the next run fails it and does it again."""
    config = _config(image_folder, tmp_path / "search", ["lr=0.01,0.02"], prune=False)
    study = search._open_study(config)
    study.enqueue_trial({"lr": 0.02})
    orphan = study.ask()
    orphan.suggest_categorical("lr", [0.01, 0.02])  # ...and then the process died
    fake = FakeFit(lambda lr, _: [1.0, 0.9])
    monkeypatch.setattr(search, "fit", fake)
    records = run_search(config)
    assert sorted(call["lr"] for call in fake.calls) == [0.01, 0.02]
    assert [r.outcome for r in records if r.number == orphan.number] == ["failed"]
    assert sorted(r.params["lr"] for r in records if r.outcome == "complete") == [0.01, 0.02]


def test_lr_auto_is_refused_in_a_search():
    with pytest.raises(SearchError, match="lr=auto"):
        parse_param("lr=auto,0.01")


def test_resume_with_other_settings_is_refused(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(search, "fit", FakeFit(lambda lr, _: [1.0, 0.9]))
    out = tmp_path / "search"
    run_search(_config(image_folder, out, ["lr=0.01,0.02"]))
    with pytest.raises(SearchError, match="other settings"):
        run_search(_config(image_folder, out, ["lr=0.01,0.03"]))


def test_trials_worse_than_the_median_are_pruned(image_folder, tmp_path, monkeypatch):
    # Three good trials first, then two whose loss at epoch 2 is far above their median.
    losses = {0.01: [1.0, 0.5, 0.4, 0.3], 0.02: [1.0, 0.6, 0.5, 0.4], 0.03: [1.0, 0.55, 0.45, 0.35],
              0.04: [1.0, 2.0, 2.0, 2.0], 0.05: [1.0, 3.0, 3.0, 3.0]}
    fake = FakeFit(lambda lr, _: losses[lr])
    monkeypatch.setattr(search, "fit", fake)
    config = _config(image_folder, tmp_path / "s", ["lr=0.01,0.02,0.03,0.04,0.05"], prune_startup=3, prune_warmup=2)
    config.base.epochs = 4
    records = {r.params["lr"]: r for r in run_search(config)}
    assert [records[lr].outcome for lr in (0.01, 0.02, 0.03)] == ["complete"] * 3
    assert records[0.04].outcome == records[0.05].outcome == "pruned"
    assert records[0.04].epochs == 2, "pruned at the first epoch the pruner may judge"
    table = results_markdown(list(records.values()), ["lr"])
    lines = [line for line in table.splitlines()[2:]]
    assert lines[0].split("|")[3].strip() == "0.01" and lines[-1].endswith("pruned |")


def test_diverged_trial_is_a_result_and_not_rerun(image_folder, tmp_path, monkeypatch):
    fake = FakeFit(lambda lr, _: [1.0, 0.9], diverge={0.5})
    monkeypatch.setattr(search, "fit", fake)
    config = _config(image_folder, tmp_path / "s", ["lr=0.01,0.5"], prune=False)
    outcomes = {r.params["lr"]: r.outcome for r in run_search(config)}
    assert outcomes == {0.01: "complete", 0.5: "diverged"}
    again = FakeFit(lambda lr, _: [1.0, 0.9])
    monkeypatch.setattr(search, "fit", again)
    run_search(config)
    assert again.calls == []


def test_tpe_samples_inside_the_ranges(image_folder, tmp_path, monkeypatch):
    fake = FakeFit(lambda lr, _: [1.0, abs(lr - 0.01) + 0.1])
    monkeypatch.setattr(search, "fit", fake)
    config = _config(image_folder, tmp_path / "s", ["lr=1e-3..1e-1:log", "c1=4..8"], sampler="tpe", trials=3,
                     prune=False)
    records = run_search(config)
    assert len(records) == 3
    assert all(1e-3 <= r.params["lr"] <= 1e-1 and 4 <= r.params["c1"] <= 8 for r in records)
    assert all(isinstance(r.params["c1"], int) for r in records)
    with pytest.raises(SearchError, match="needs --trials"):
        run_search(_config(image_folder, tmp_path / "t", ["lr=1e-3..1e-1:log"], sampler="random"))


def test_retrain_best_trains_the_winner_into_a_bundle(image_folder, tmp_path, monkeypatch):
    import json

    wider_is_better = lambda lr, model: [1.0, 0.5 if model.features[0].out_channels == 8 else 0.8]  # noqa: E731
    monkeypatch.setattr(search, "fit", FakeFit(wider_is_better))
    config = _config(image_folder, tmp_path / "s", ["c1=4,8"], prune=False)
    run_search(config)
    best, result = search.retrain_best(config, epochs=1)  # reads the trials back from the storage
    assert best.params == {"c1": 8}
    bundle_config = json.loads((result.bundle_dir / "config.json").read_text())
    assert bundle_config["model_args"]["c1"] == 8
    assert bundle_config["classifier"]["training"]["epochs"] == 1
    assert result.bundle_dir == tmp_path / "s" / "best" / "bundle"


def test_command_line_end_to_end(image_folder, tmp_path, capsys):
    out = tmp_path / "cli"
    code = search_cli.main(["--data", str(image_folder), "--model", "configurable_cnn", "--grid", "c1=4",
                        "--set", "batch_size=16", "lr=0.05", "--trial-epochs", "1", "--workers", "0",
                        "--no-prune", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.out.count("complete") == 2  # the trial's line, and its row in the table
    assert "| rank | trial | c1 | val_loss" in printed.out
    assert search_cli.main(["--data", str(image_folder), "--grid", "c1=4", "--set", "nonsense=1", "--out", str(out)]) == 2
    assert "--set nonsense=1" in capsys.readouterr().err
