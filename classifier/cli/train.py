"""Train or fine-tune an image classifier and save it as a bundle (optionally pushed to the Hub).

    python -m classifier train --data path/to/photos --out runs/mine      (everything else chosen from the data)
    python -m classifier train --data path/to/photos --time-budget 10    (the best it can in 10 minutes here)
    python -m classifier train --data path/to/photos --model tf_efficientnet_lite0 --epochs 5
    python -m classifier train --config runs/fast10/config.yaml --epochs 20   (a file sets defaults, flags win)
    python -m classifier train ... --init-from runs/lite0/bundle --image-size 224 --epochs 2   (go on training)
    torchrun --nproc_per_node=4 training/finetune.py ...      (DistributedDataParallel)
    python -m classifier train ... --push-to-hub alice/cifar10-fast-cnn [--private] [--revision v2]

`python training/finetune.py` is the same command. Every option has a default (classifier.config);
those left to the data (model, input size, batch size, epochs, learning rate) are chosen when the
data is loaded (classifier.auto), and the run says what it chose and why. Options are checked
before any data is loaded. Checkpoints, logs and the resolved configuration (config.yaml) go to
--out (default: a new runs/<data>-<model>-<time> folder), the bundle to --out/bundle; an --out that
holds a bundle is refused unless --overwrite; `--resume` continues an interrupted run from
--out/last.pt (without --out: the newest unfinished run of that data and model). Under
torchrun --max-restarts, a restarted job (TORCHELASTIC_RESTART_COUNT > 0) resumes by itself.
Exit status: 0 done, 2 a problem with data, arguments or weights, 3 trained and saved but the push
to the Hub failed (the bundle stays; `python -m classifier push` retries it), 130 interrupted.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from classifier import distributed
from classifier.bundle import is_hub_id, read_config, resolve_location
from classifier.checks import check_data_source, check_model, check_pretrained
from classifier.cli.common import (DEFAULTS, add_data_options, add_model_options, alpha_value, checked_number,
                                   command_line, ema_decay_value, fraction_value, lr_value, positive_int, report,
                                   run_values)
from classifier.config import DEFAULT_TIME_BUDGET, RECIPES, RunConfig, apply_recipe, read_config_file
from classifier.errors import USER_ERRORS, BundleError, ConfigError, HubError
from classifier.hub import upload_blocker, validate_repo_id
from classifier.publish import push_bundle
from classifier.run import check_out, run, summarize
from classifier.transforms import AUGMENTS
from classifier.tta import TTA_MODES

PROG = "python -m classifier train"
CHOSEN = "(default: chosen from the data: see classifier.auto)"

non_negative_int = checked_number(lambda value: value >= 0, "must be 0 or more, not {text}", int)
non_negative = checked_number(lambda value: value >= 0, "must be 0 or more, not {text}")
minutes_value = checked_number(lambda value: value > 0, "the time budget is a number of minutes above 0, not {text}")
finder_steps_value = checked_number(lambda value: value >= 10, "the range test needs at least 10 steps, not {text}", int)


def repo_id_value(text: str) -> str:
    """--push-to-hub: checked before training starts, not after hours of it."""
    try:
        return validate_repo_id(text)
    except HubError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown after each option, except where the help says itself what the default is."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="a YAML file of settings (recipes/*.yaml, or a run's OUT/config.yaml) that replace the "
                        "defaults; options given on the command line override it")
    add_data_options(p)
    g = add_model_options(p)
    g.add_argument("--init-from", metavar="BUNDLE", default=d.init_from,
                   help="start from this bundle's weights (a folder or Hub id) instead of ImageNet's: with the same "
                        "classes its head too, e.g. to go on training at a higher --image-size; --model defaults to its architecture")
    g.add_argument("--init-from-revision", metavar="REV", default=d.init_from_revision,
                   help="with a Hub --init-from: the branch, tag or commit to start from (default: the latest "
                        "commit, which the bundle records)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--recipe", choices=["auto", "none", *RECIPES], default="auto",
                   help="fill the options not given from a policy: fast = airbench94's (batch 512, SGD lr 0.75 "
                        "Nesterov 0.85, label smoothing 0.2, bf16, TTA; see classifier.config.RECIPES); "
                        "auto = fast for fast_cnn from scratch (not with --init-from), none otherwise")
    g.add_argument("--time-budget", metavar="MINUTES", type=minutes_value, default=d.time_budget,
                   help=f"the best this machine can do in about this many minutes: the input size and epochs left to "
                        f"the data are chosen to fit it (default: {DEFAULT_TIME_BUDGET:g} where they are ours to choose)")
    g.add_argument("--epochs", type=positive_int("--epochs"), default=d.epochs,
                   help=f"passes over the training split {CHOSEN}")
    g.add_argument("--batch-size", type=positive_int("--batch-size"), default=d.batch_size,
                   help=f"global batch size, split across DDP processes {CHOSEN}")
    g.add_argument("--lr", type=lr_value, default=d.lr,
                   help="peak learning rate, or 'auto' to run the learning-rate range test first and use its "
                        "suggestion (default: the measured default: fine-tuning SGD 0.02 per 32 images, from scratch "
                        "0.05 per 128; AdamW 1e-3)")
    g.add_argument("--lr-finder-steps", type=finder_steps_value, default=d.lr_finder_steps,
                   help="steps of the range test --lr auto runs (default: 100)")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default=d.optimizer, help="SGD with (Nesterov) momentum, or AdamW")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=d.nesterov, help="Nesterov momentum for SGD")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="decoupled for AdamW; not applied to biases and norms")
    g.add_argument("--schedule", choices=["onecycle", "cosine", "constant"], default=d.schedule, help="learning-rate schedule, stepped per batch")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up length (onecycle: its rising phase)")
    g.add_argument("--label-smoothing", type=fraction_value, default=d.label_smoothing, help="cross-entropy label smoothing")
    g.add_argument("--augment", choices=list(AUGMENTS), default=d.augment,
                   help="training augmentation: " + "; ".join(f"{k}: {v}" for k, v in AUGMENTS.items()).replace("%", "%%"))
    g.add_argument("--random-erasing", type=fraction_value, default=d.random_erasing,
                   help="erase a random box in this share of the training images (timm's RandomErasing; 0.25 is usual)")
    g.add_argument("--mixup", type=alpha_value, default=d.mixup,
                   help="mixup alpha: train on blends of two images and their labels (timm's Mixup; 0.2 is usual; 0 = off)")
    g.add_argument("--cutmix", type=alpha_value, default=d.cutmix,
                   help="cutmix alpha: paste a box of one image into another, labels by area (1.0 is usual; 0 = off); "
                        "with --mixup too, each batch gets one of the two")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm")
    g.add_argument("--model-ema-decay", dest="ema_decay", type=ema_decay_value, default=d.ema_decay,
                   help="keep an exponential moving average of the weights (timm's --model-ema), validated and "
                        "delivered instead of the raw weights: its decay per step, e.g. 0.9998 (0 = off)")
    g.add_argument("--model-ema-warmup", dest="ema_warmup", action="store_true", default=d.ema_warmup,
                   help="timm's warm-up: the first step's weights replace the initial ones and the decay grows from "
                        "there (by default the average starts at the initial weights and keeps a decaying share: "
                        "what fine-tuning a good model wants)")
    g.add_argument("--freeze-epochs", type=non_negative_int, default=d.freeze_epochs, help="epochs training only the new head (default: 1 when pretrained)")
    g.add_argument("--backbone-lr-scale", type=float, default=d.backbone_lr_scale, help="body learning rate / head learning rate (default: 0.1 when pretrained)")
    g.add_argument("--patience", type=positive_int("--patience"), default=d.patience,
                   help="early stopping: epochs without a better validation loss (default: none; a third of the "
                        "epochs on fine-tuning runs of 10 or more)")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default=d.amp, help="mixed precision (auto: bf16/fp16 on CUDA, fp32 on CPU)")
    g.add_argument("--sync-batchnorm", action="store_true", default=d.sync_batchnorm,
                   help="with DDP: synchronise BatchNorm statistics across processes")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, mps")
    g.add_argument("--workers", type=non_negative_int, default=d.workers, help="DataLoader worker processes")
    g.add_argument("--loader", choices=["auto", "memory", "workers"], default=d.loader,
                   help="memory: small images as one tensor on the device, augmented there in batches "
                        "(classifier.fastdata); workers: a DataLoader with worker processes; auto: memory "
                        "when the data was decoded into memory and fits")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=d.out, help="run folder: checkpoints, metrics.jsonl, curves.png, config.yaml; the bundle "
                                                "in OUT/bundle (default: a new runs/<data>-<model>-<date>-<time>)")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT/last.pt (without --out: the newest unfinished run of this data and model)")
    g.add_argument("--overwrite", action="store_true", help="replace the run in an --out that holds one already")
    g.add_argument("--tta", choices=list(TTA_MODES), default=d.tta,
                   help="evaluate with test-time augmentation, which the bundle records and the app then "
                        "predicts with: flip (the mirror image, 2x the work), flip-shift (and 1-pixel shifts, 6x)")
    g.add_argument("--mistakes", type=non_negative_int, default=d.mistakes,
                   help="how many misclassified images of the split eval/ shows to keep in the bundle, most "
                        "confident first (default: every one; their thumbnails are small)")
    g.add_argument("--push-to-hub", metavar="OWNER/NAME", type=repo_id_value, default=None,
                   help="after training, upload the bundle with its model card to this Hub model repository")
    g.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    g.add_argument("--revision", default=None, help="with --push-to-hub: branch to push to (created if missing)")
    g.add_argument("--commit-message", default=None, help="with --push-to-hub: the commit message")
    return p


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The RunConfig fields of the options that `argv` sets (a recipe fills only the others).

    argparse itself decides, on a copy of the parser whose defaults are all SUPPRESS (absent from
    the namespace unless given), so abbreviations (--batch for --batch-size) count as given too.
    """
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def apply_config_file(parser: argparse.ArgumentParser, path: str) -> set[str]:
    """Make the settings of the config file at `path` the parser's defaults, each checked as its
    option would check it; returns their names."""
    values = read_config_file(path)
    actions = {a.dest: a for a in parser._actions}
    checked = {}
    for name, value in values.items():
        action = actions.get(name)
        if action is None:
            raise ConfigError(f"{path}: '{name}' is not an option of {PROG}")
        if isinstance(value, str) and action.type is not None:
            try:
                value = action.type(value)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise ConfigError(f"{path}: {name}: {exc}") from None
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"{path}: {name} must be one of {', '.join(map(str, action.choices))}, not {value!r}")
        checked[name] = value
    parser.set_defaults(**checked)
    return set(checked)


def parse(argv: list[str]) -> tuple[argparse.Namespace, set[str]]:
    """The options of `argv` over those of its --config file over the defaults, and the names of
    the settings the user chose (on the command line or in the file)."""
    parser = build_parser()
    config_path = parser.parse_known_args(argv)[0].config
    from_file = apply_config_file(parser, config_path) if config_path else set()
    args = parser.parse_args(argv)
    return args, given_options(parser, argv) | from_file


def config_from_args(args: argparse.Namespace, given: set[str] = frozenset(), command: str | None = None) -> RunConfig:
    values = run_values(args)
    if args.init_from_revision and not (args.init_from and is_hub_id(args.init_from)):
        raise BundleError("--init-from-revision names a commit of a Hub --init-from (owner/name), "
                          "not of a local folder")
    if args.init_from and "model" not in given:
        folder = resolve_location(args.init_from, args.init_from_revision)
        values["model"] = read_config(folder)["architecture"]
        if is_hub_id(args.init_from):
            # The weights must come from the commit whose config was just read, even if the
            # repository changes meanwhile: pin it (its snapshot folder is named after it).
            values["init_from_revision"] = folder.name
    return RunConfig(**apply_recipe(values, given), command=command or command_line())


def check_options(cfg: RunConfig, overwrite: bool = False) -> None:
    """What can be checked before any data is loaded: the model's name and weights, the data's
    source, and the run folder (classifier.checks, run.check_out)."""
    check_model(cfg.model)
    if cfg.resolved_pretrained() and not cfg.init_from and cfg.model != "auto":
        check_pretrained(cfg.model, cfg.pretrained_source)
    elif cfg.pretrained and cfg.model != "auto":
        check_pretrained(cfg.model, cfg.pretrained_source)  # --pretrained on one of our nets: it has none
    check_data_source(cfg.data)
    check_out(cfg.out, cfg.resume, overwrite)


def push(bundle_dir: Path, args: argparse.Namespace) -> int:
    """Upload the saved bundle. A failure leaves it in place and says so: exit status 3."""
    try:
        pushed = push_bundle(bundle_dir, args.push_to_hub, private=args.private, revision=args.revision,
                             commit_message=args.commit_message)
    except USER_ERRORS as exc:
        report(exc)
        return 3
    print(f"pushed {len(pushed.files)} files to {pushed.url}")
    return 0


@record  # under torchrun: a failing process's traceback is written where torchrun reports it
def main(argv: list[str] | None = None) -> int:
    # The command the bundle records: as typed in the shell, or as called (from a recipe, say).
    command = command_line() if argv is None else command_line(argv, PROG)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, given = parse(argv)
        distributed.init_from_env(args.device)  # a bad CLASSIFIER_COLLECTIVE_TIMEOUT is a ConfigError
    except ConfigError as exc:
        return report(exc)
    is_main = distributed.is_main_process()
    # Under torchrun every process runs this; rank 0 reports progress, the others only problems.
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s",
                        stream=sys.stdout)
    if distributed.restarted() and not args.resume:
        # torchrun --max-restarts started the job again after a process failed: continue from the
        # last checkpoint in --out rather than start over.
        args.resume = True
        logging.getLogger(__name__).info("restarted by torchrun after a failure: resuming from %s", args.out)
    blocker = upload_blocker() if is_main and args.push_to_hub else None
    if blocker:  # said now rather than after training; the run goes ahead and keeps its bundle anyway
        logging.getLogger(__name__).warning("warning: the push to %s will fail: %s", args.push_to_hub, blocker)
    cfg = None
    try:
        cfg = config_from_args(args, given, command)
        if is_main:
            check_options(cfg, args.overwrite)
        result = run(cfg, given)
    except KeyboardInterrupt:
        where = f" --out {cfg.out}" if cfg and cfg.out else ""
        print(f"interrupted; continue with the same command plus --resume{where}", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        # Problems with data, arguments or weights are reported as one readable line, no traceback.
        return report(exc)
    finally:
        distributed.shutdown()
    if is_main:  # asked before shutdown(): afterwards every process would call itself rank 0
        print(summarize(result))
        if args.push_to_hub:
            return push(result.bundle_dir, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
