"""--init-from: a run that starts from a bundle's weights (go on training, or fine-tune on other classes)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import shutil

from classifier.bundle import BundleError, lineage, load_bundle, stage_record
from classifier.app_logic import model_summary
from classifier.config import RunConfig, TrainConfig
from classifier.run import prepare
from tests.test_finetune_cli import finetune


def shapes_of(bundle):
    return bundle.parent.parent / "shapes"  # where conftest's tiny_bundle was trained


def test_the_same_classes_start_from_the_whole_bundle(tiny_bundle, one_torch_thread):
    cfg = RunConfig(data=str(shapes_of(tiny_bundle)), model="fast_cnn", init_from=str(tiny_bundle), workers=0)
    setup = prepare(cfg, torch.device("cpu"))
    saved = load_file(str(tiny_bundle / "model.safetensors"))
    state = setup.model.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert not setup.new_head
    fit_cfg = TrainConfig.from_run(cfg, setup.new_head)
    assert fit_cfg.freeze_epochs == 0 and fit_cfg.backbone_lr_scale == 1.0  # nothing new to protect the body from
    pcfg = json.loads((tiny_bundle / "config.json").read_text())["pretrained_cfg"]
    assert setup.pretrained_cfg["mean"] == pytest.approx(pcfg["mean"])  # normalised as the weights were trained
    assert setup.model_args == {"widths": [16, 32, 64]}


def test_other_classes_keep_the_body_under_a_new_zero_head(tiny_bundle, one_torch_thread):
    labels = json.loads((tiny_bundle / "config.json").read_text())["label_names"]
    cfg = RunConfig(data=str(shapes_of(tiny_bundle)), model="fast_cnn", init_from=str(tiny_bundle),
                    classes=labels[:2], workers=0)
    setup = prepare(cfg, torch.device("cpu"))
    head = setup.model.get_classifier()
    assert head.out_features == 2
    assert all(not p.any() for p in head.parameters())
    saved = load_file(str(tiny_bundle / "model.safetensors"))
    head_keys = {k for k in saved if k.startswith(setup.model.head_name + ".")}
    assert head_keys
    state = setup.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items() if k not in head_keys)
    assert setup.new_head
    fit_cfg = TrainConfig.from_run(cfg, setup.new_head)
    assert fit_cfg.freeze_epochs == 1 and fit_cfg.backbone_lr_scale == 0.1


@pytest.mark.parametrize("changes, message", [
    ({"model": "tutorial_cifar_cnn"}, "holds a fast_cnn, not a tutorial_cifar_cnn"),
    ({"model_args": {"widths": [8, 8, 8]}}, "--model-args cannot change"),
])
def test_a_different_model_is_refused(tiny_bundle, changes, message):
    cfg = RunConfig(**{"data": str(shapes_of(tiny_bundle)), "model": "fast_cnn", "init_from": str(tiny_bundle),
                       "workers": 0} | changes)
    with pytest.raises(BundleError, match=message):
        prepare(cfg, torch.device("cpu"))


def test_the_command_line_takes_the_model_from_the_bundle(tiny_bundle, tmp_path):
    out = tmp_path / "more"
    result = finetune("--data", shapes_of(tiny_bundle), "--init-from", tiny_bundle, "--epochs", "1",
                      "--batch-size", "32", "--lr", "0.01", "--workers", "0", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "its head included" in result.stdout
    config = json.loads((out / "bundle" / "config.json").read_text())
    assert config["architecture"] == "fast_cnn" and config["model_args"]["widths"] == [16, 32, 64]
    assert config["classifier"]["training"]["init_from"] == str(tiny_bundle)
    # fast_cnn's automatic recipe is for training from scratch, not for going on from a bundle
    assert config["classifier"]["training"]["recipe"] == "none"
    assert config["classifier"]["training"]["label_smoothing"] == 0.0

    # The new bundle says how the one it started from was made, so both stages can be redone.
    first = json.loads((tiny_bundle / "config.json").read_text())["classifier"]
    first_metrics = json.loads((tiny_bundle / "eval" / "metrics.json").read_text())
    stage = config["classifier"]["started_from"]
    assert stage["bundle"] == str(tiny_bundle) and stage["command"] == first["command"]
    assert stage["accuracy"] == first_metrics["accuracy"] and stage["input_size"] == [3, 32, 32]
    card = (out / "bundle" / "README.md").read_text()
    assert "Stage 1 (32x32 px input" in card and first["command"] in card
    assert "The exact command of the last stage" in card and "--init-from" in card
    summary = model_summary(load_bundle(out / "bundle"), str(out / "bundle"))
    assert "| Training stage 1 | `" + first["command"] in summary


def test_a_hub_source_is_recorded_by_its_id_and_commit_not_by_this_machines_cache(tiny_bundle, tmp_path):
    # What hub.download_bundle returns: a snapshot folder named after the commit, in the local cache.
    snapshot = tmp_path / "models--owner--name" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_bundle, snapshot)
    record = stage_record(load_bundle(snapshot), "owner/name")
    assert record["bundle"] == "owner/name" and record["revision"] == "0123abcd"
    local = stage_record(load_bundle(tiny_bundle), str(tiny_bundle))
    assert local["bundle"] == str(tiny_bundle) and "revision" not in local


def test_lineage_lists_the_stages_earliest_first():
    project = {"command": "third", "started_from": {"command": "second", "started_from": {"command": "first"}}}
    assert [stage["command"] for stage in lineage(project)] == ["first", "second"]
    assert lineage({"command": "only"}) == []


def test_the_command_line_reports_a_missing_bundle_in_one_line(tmp_path):
    result = finetune("--init-from", tmp_path / "nothing", "--epochs", "1", "--out", tmp_path / "r")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "no such bundle" in result.stderr
    assert "Traceback" not in result.stderr
