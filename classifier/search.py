"""Hyperparameter search: many short trials, a table of results, then the winner trained in full.

    python -m classifier search --data cifar10 --data-dir cifar10-jpeg.tar.gz --model configurable_cnn \\
        --grid c1=16,32 c2=32,64 l1=128,256 lr=0.01,0.05 batch_size=64,128 --trial-epochs 4
    python -m classifier search ... --sampler tpe --trials 30 --grid "lr=1e-3..0.3:log" c1=8..64
    python -m classifier search ... --retrain-best --epochs 30      (after, or together with, a search)

A parameter named like a RunConfig field (lr, batch_size, optimizer, weight_decay, image_size, ...)
sets that field; any other name is a model argument (configurable_cnn's c1, c2, l1). Values are a
comma-separated list (grid search, or a categorical choice for TPE/random) or a range `low..high`
with an optional `:log` (TPE/random only; integers when both ends are).

Every trial trains on the same split with the same seed, for --trial-epochs at most, stopping early
after --patience epochs without a better validation loss, and Optuna's median pruner stops trials
whose validation loss is worse than the median of earlier trials at the same epoch. Trials are stored
in OUT/search.db (SQLite) as each one ends, so an interrupted search, run again with the same
command, skips the trials already done. OUT/results.md and OUT/results.csv rank them by validation
loss. The test split is never looked at here; --retrain-best trains the winner through the normal
pipeline (classifier.run.run), which evaluates it on test and saves its bundle in OUT/best.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from classifier.allocator import keep_freed_memory
from classifier.auto import resolve
from classifier.config import RUN_FIELDS, RunConfig, TrainConfig
from classifier.errors import SearchError, TrainingDiverged
from classifier.loop import BEST_WEIGHTS, LAST_CHECKPOINT, fit
from classifier.run import RunResult, load_run_data, prepare, run
from classifier.runtime import pick_device

log = logging.getLogger(__name__)

STORAGE_FILE = "search.db"
STUDY_NAME = "search"
# Fields a trial may not vary: they change the data (every trial must see the same split), where
# things are written, or what --trial-epochs already says.
FIXED_FIELDS = {"data", "data_dir", "image_dir", "classes", "val_fraction", "test_fraction", "out", "resume",
                "command", "device", "workers", "epochs", "model_args", "mistakes", "tta", "sync_batchnorm",
                "recipe", "lr_finder_steps"}


# ----------------------------------------------------------------------------------------------
# The search space


def parse_value(text: str) -> int | float | bool | str:
    """'16' -> 16, '0.05' -> 0.05, '1e-3' -> 0.001, 'true' -> True, anything else stays a string."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass
class Param:
    name: str
    choices: list | None = None  # a list of values, or else a range:
    low: float | None = None
    high: float | None = None
    log: bool = False

    @property
    def is_range(self) -> bool:
        return self.choices is None

    def suggest(self, trial) -> Any:
        """This parameter's value for an Optuna trial."""
        if not self.is_range:
            return trial.suggest_categorical(self.name, self.choices)
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def spec(self) -> str:
        if not self.is_range:
            return f"{self.name}={','.join(map(str, self.choices))}"
        return f"{self.name}={self.low}..{self.high}" + (":log" if self.log else "")


def parse_param(spec: str) -> Param:
    """'c1=16,32' (choices), 'lr=1e-4..0.1:log' or 'c1=8..64' (ranges)."""
    name, sep, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name or not values.strip():
        raise SearchError(f"'{spec}': write a parameter as name=v1,v2,... or name=low..high[:log]")
    if name in FIXED_FIELDS:
        raise SearchError(f"'{name}' cannot vary between trials (every trial must see the same data, "
                          f"and --trial-epochs sets the length); set it once for the whole search")
    if ".." in values:
        bounds, _, scale = values.partition(":")
        low, _, high = bounds.partition("..")
        low, high = parse_value(low), parse_value(high)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
            raise SearchError(f"'{spec}': a range needs two numbers, low..high with low < high")
        if scale not in ("", "log"):
            raise SearchError(f"'{spec}': the only scale is ':log'")
        if scale == "log" and low <= 0:
            raise SearchError(f"'{spec}': a log range must be above zero")
        return Param(name, low=low, high=high, log=scale == "log")
    choices = [parse_value(v) for v in values.split(",") if v.strip()]
    if name == "lr" and "auto" in choices:
        raise SearchError("lr=auto has no place in a search: search over learning rates, e.g. lr=0.01,0.05, "
                          "or run python -m classifier.lr_finder first to see the useful range")
    if len(set(map(repr, choices))) != len(choices):
        raise SearchError(f"'{spec}': a value is listed twice")
    return Param(name, choices=choices)


def parse_space(specs: list[str]) -> dict[str, Param]:
    space: dict[str, Param] = {}
    for spec in specs:
        param = parse_param(spec)
        if param.name in space:
            raise SearchError(f"'{param.name}' is given twice")
        space[param.name] = param
    if not space:
        raise SearchError("give at least one parameter to search, e.g. --grid lr=0.01,0.05")
    return space


def grid_points(space: dict[str, Param]) -> list[dict]:
    """Every combination of the choices, in a fixed order (the first parameter varies slowest)."""
    ranges = [p.spec() for p in space.values() if p.is_range]
    if ranges:
        raise SearchError(f"a grid needs lists of values, not ranges ({', '.join(ranges)}); "
                          f"use --sampler tpe or random for ranges")
    names = list(space)
    return [dict(zip(names, values)) for values in itertools.product(*(space[n].choices for n in names))]


def trial_config(base: RunConfig, params: dict, out: Path) -> RunConfig:
    """`base` with a trial's parameters: RunConfig fields set directly, the rest as model arguments."""
    run_fields = {k: v for k, v in params.items() if k in RUN_FIELDS}
    model_args = {**base.model_args, **{k: v for k, v in params.items() if k not in RUN_FIELDS}}
    return replace(base, **run_fields, model_args=model_args, out=str(out), resume=False)


# ----------------------------------------------------------------------------------------------
# Running trials


@dataclass
class TrialRecord:
    number: int
    params: dict
    outcome: str  # "complete", "pruned", "diverged" (the loss became NaN: a result, not an error), "failed"
    val_loss: float | None = None  # the best validation loss of the trial
    val_acc: float | None = None  # the validation accuracy at that epoch
    best_epoch: int | None = None
    epochs: int = 0  # epochs trained (fewer than asked when stopped early or pruned)
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


# Outcomes that are a trial's answer: a rerun would only repeat them. "failed" trials (interrupted,
# or an error) are run again on resume.
FINISHED = ("complete", "pruned", "diverged")


@dataclass
class SearchConfig:
    base: RunConfig  # data, model and every setting the trials share; base.epochs = epochs per trial
    space: dict[str, Param]
    sampler: str = "grid"  # "grid", "tpe" or "random"
    trials: int | None = None  # how many finished trials to reach (grid: all of its points by default)
    prune: bool = True
    prune_startup: int = 3  # finished trials before the pruner starts judging
    prune_warmup: int = 2  # the earliest epoch at which a trial can be pruned
    out: Path = Path("runs/search")

    def settings(self) -> dict:
        """What must not change between a search and its resumption (the trial count may grow)."""
        base = {k: v for k, v in vars(self.base).items() if k not in ("out", "resume", "command", "device", "workers")}
        return {"base": base, "space": [p.spec() for p in self.space.values()], "sampler": self.sampler,
                "prune": self.prune}


def optuna_module():
    try:
        import optuna
    except ImportError as exc:
        raise SearchError("the search needs Optuna: pip install optuna") from exc
    return optuna


def _open_study(config: SearchConfig):
    optuna = optuna_module()
    config.out.mkdir(parents=True, exist_ok=True)
    seed = config.base.seed
    sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
               "random": lambda: optuna.samplers.RandomSampler(seed=seed),
               # grid points are enqueued by run_search; the sampler never has to choose
               "grid": lambda: optuna.samplers.RandomSampler(seed=seed)}[config.sampler]()
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=config.prune_startup,
                                          n_warmup_steps=config.prune_warmup)
              if config.prune else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=f"sqlite:///{(config.out / STORAGE_FILE).resolve()}",
                                study_name=STUDY_NAME, direction="minimize", sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    settings = json.loads(json.dumps(config.settings()))  # as stored: tuples become lists
    stored = study.user_attrs.get("settings")
    if stored is None:
        study.set_user_attr("settings", settings)
    else:
        # Settings that this version has and the stored search lacks (a newer RunConfig field) are
        # not a difference: the stored trials ran with that field's default.
        changed = sorted(k for k in settings if k != "base" and stored.get(k) != settings[k])
        changed += sorted(k for k in settings["base"]
                          if k in stored.get("base", {}) and stored["base"][k] != settings["base"][k])
        if changed:
            raise SearchError(f"{config.out} holds a search with other settings ({', '.join(changed)}); "
                              f"run it with the same arguments to resume it, or choose another --out")
    # A trial still "running" in the storage was cut off (killed, or the machine went down): it is
    # not an answer, so mark it failed and let this run do it again.
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        log.info("trial %d was interrupted; it will run again", trial.number)
    return study


def _record(frozen) -> TrialRecord:
    attrs = frozen.user_attrs
    outcome = attrs.get("outcome", "failed")
    return TrialRecord(number=frozen.number, params=dict(frozen.params), outcome=outcome,
                       val_loss=attrs.get("val_loss"), val_acc=attrs.get("val_acc"),
                       best_epoch=attrs.get("best_epoch"), epochs=attrs.get("epochs", 0),
                       seconds=attrs.get("seconds", 0.0), history=attrs.get("history", []))


def load_records(out: str | Path) -> list[TrialRecord]:
    """Every trial stored in a search folder, in the order they started."""
    optuna = optuna_module()
    path = Path(out) / STORAGE_FILE
    if not path.exists():
        raise SearchError(f"{out}: no search here (no {STORAGE_FILE})")
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{path.resolve()}")
    return [_record(t) for t in study.get_trials(deepcopy=False)]


def _run_trial(trial, params: dict, config: SearchConfig, data, device) -> TrialRecord:
    optuna = optuna_module()
    out = config.out / "trials" / f"{trial.number:04d}"
    cfg = trial_config(config.base, params, out)
    history: list[dict] = []

    def after_epoch(record: dict) -> None:
        history.append(record)
        trial.report(record["val_loss"], record["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"validation loss {record['val_loss']:.4f} at epoch {record['epoch']} "
                                     f"is worse than the median of earlier trials")

    started = time.perf_counter()
    outcome = "complete"
    try:
        setup = prepare(cfg, device, data=data)
        fit(setup.model, setup.train_loader, setup.val_loader, TrainConfig.from_run(cfg, setup.new_head), out,
            device=device, on_epoch_end=after_epoch)
    except optuna.TrialPruned:
        outcome = "pruned"
    except TrainingDiverged:
        outcome = "diverged"
    finally:
        # The checkpoint and weights only served this trial; the winner is retrained in full.
        for name in (LAST_CHECKPOINT, BEST_WEIGHTS):
            (out / name).unlink(missing_ok=True)
    best = min(history, key=lambda r: r["val_loss"]) if history else None
    return TrialRecord(trial.number, params, outcome, val_loss=best and best["val_loss"],
                       val_acc=best and best["val_acc"], best_epoch=best and best["epoch"], epochs=len(history),
                       seconds=time.perf_counter() - started, history=history)


def _finish(study, trial, record: TrialRecord) -> None:
    """Store the record with the trial, and close the trial with the state Optuna understands."""
    optuna = optuna_module()
    for key in ("outcome", "val_loss", "val_acc", "best_epoch", "epochs", "seconds", "history"):
        trial.set_user_attr(key, getattr(record, key))
    if record.outcome == "complete":
        study.tell(trial, record.val_loss)
    elif record.outcome == "pruned":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)


def run_search(config: SearchConfig, on_trial_end: Callable[[TrialRecord], None] | None = None
               ) -> list[TrialRecord]:
    """Run the trials still to do (a rerun skips those already finished); returns every trial."""
    if config.sampler not in ("grid", "tpe", "random"):
        raise SearchError(f"unknown sampler '{config.sampler}' (grid, tpe or random)")
    points = grid_points(config.space) if config.sampler == "grid" else None
    if points is None and not config.trials:
        raise SearchError(f"--sampler {config.sampler} needs --trials N")
    target = min(config.trials or len(points), len(points)) if points else config.trials
    study = _open_study(config)
    optuna = optuna_module()
    device = pick_device(config.base.device)
    keep_freed_memory(device)  # faster CPU steps for every trial: see classifier/allocator.py
    data = None  # loaded once, when the first trial needs it; every trial shares the split

    while True:
        records = [_record(t) for t in study.get_trials(deepcopy=False)]
        finished = [r for r in records if r.outcome in FINISHED]
        if len(finished) >= target:
            break
        if data is None:  # before a trial is opened, so a data error leaves no trial behind
            data = load_run_data(config.base)
            # What the search leaves open (model "auto", batch size, ...) is chosen once, for every trial.
            config = replace(config, base=resolve(config.base, data, device).cfg)
        if points is not None:
            done = {json.dumps(r.params, sort_keys=True) for r in finished}
            todo = [p for p in points if json.dumps(p, sort_keys=True) not in done]
            if not todo:
                break
            study.enqueue_trial(todo[0])
        trial = study.ask()
        params = {name: param.suggest(trial) for name, param in config.space.items()}
        try:
            record = _run_trial(trial, params, config, data, device)
        except BaseException as exc:  # an error, or Ctrl-C: not an answer, so a rerun does it again
            trial.set_user_attr("outcome", "failed")
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        _finish(study, trial, record)
        records = [_record(t) for t in study.get_trials(deepcopy=False)]
        write_results(records, config.out, list(config.space))
        if on_trial_end:
            on_trial_end(record)
    write_results(records, config.out, list(config.space))
    return records


# ----------------------------------------------------------------------------------------------
# The results table


def ranked(records: list[TrialRecord]) -> list[TrialRecord]:
    """Complete trials by validation loss, then pruned ones (stopped early: not comparable), then the rest."""
    order = {"complete": 0, "pruned": 1, "diverged": 2, "failed": 3}
    return sorted(records, key=lambda r: (order[r.outcome], r.val_loss if r.val_loss is not None else math.inf,
                                          r.number))


def best_record(records: list[TrialRecord]) -> TrialRecord:
    complete = [r for r in records if r.outcome == "complete"]
    if not complete:
        raise SearchError("no trial has completed yet; run the search first")
    return ranked(complete)[0]


def _rows(records: list[TrialRecord], names: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """The table; parameter columns in the order of `names` (the search space's), else alphabetical."""
    present = {k for r in records for k in r.params}
    names = [n for n in names or [] if n in present] + sorted(present - set(names or []))
    header = ["rank", "trial", *names, "val_loss", "val_acc", "best_epoch", "epochs", "seconds", "outcome"]
    rows = []
    for rank, r in enumerate(ranked(records), 1):
        rows.append([str(rank), str(r.number), *(str(r.params.get(n, "")) for n in names),
                     "" if r.val_loss is None else f"{r.val_loss:.4f}",
                     "" if r.val_acc is None else f"{r.val_acc:.4f}",
                     "" if r.best_epoch is None else str(r.best_epoch), str(r.epochs),
                     f"{r.seconds:.1f}" if r.outcome != "failed" else "",
                     r.outcome])
    return header, rows


def results_markdown(records: list[TrialRecord], names: list[str] | None = None) -> str:
    header, rows = _rows(records, names)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def results_csv(records: list[TrialRecord], names: list[str] | None = None) -> str:
    header, rows = _rows(records, names)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_results(records: list[TrialRecord], out: Path, names: list[str] | None = None) -> tuple[Path, Path]:
    md, csv_path = out / "results.md", out / "results.csv"
    md.write_text(results_markdown(records, names))
    csv_path.write_text(results_csv(records, names))
    return md, csv_path


def retrain_best(config: SearchConfig, epochs: int, patience: int | None = None,
                 records: list[TrialRecord] | None = None) -> tuple[TrialRecord, RunResult]:
    """Train the best trial's settings for `epochs` through the full pipeline; bundle in OUT/best."""
    best = best_record(records if records is not None else load_records(config.out))
    cfg = trial_config(config.base, best.params, config.out / "best")
    cfg = replace(cfg, epochs=epochs, patience=patience,
                  command=f"{config.base.command or 'python -m classifier search'}  (best trial {best.number})")
    best_dir = config.out / "best"
    if best_dir.exists():
        shutil.rmtree(best_dir)  # a previous retraining's checkpoint must not be resumed by accident
    return best, run(cfg)
