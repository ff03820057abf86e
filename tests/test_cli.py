"""The command line end to end on the `debug` preset: train -> eval / predict / inspect / plot, errors."""

import json
import re

import pytest

from dyntrm.cli import main
from helpers import TASKS

TRAIN = ["train", "--preset", "debug", "--source", str(TASKS), "--set", "data.train_splits=",
         "--set", "data.demo_splits=all", "--set", "data.eval_split=all", "--set", "train.warmup=1"]


SUBCOMMANDS = ["data", "show", "train", "eval", "predict", "inspect", "plot", "info", "demo"]


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    # the entries of the COMMAND list, not words anywhere (they also appear in the help texts)
    listed = re.findall(r"^    (\w+)(?:\s{2,}\S|$)", capsys.readouterr().out, re.M)
    assert listed == SUBCOMMANDS
    for cmd in SUBCOMMANDS:  # and each one is a subcommand with its own help
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0 and f"usage: dyntrm {cmd}" in capsys.readouterr().out


def test_unknown_override_is_an_error_listing_valid_keys(capsys):
    assert main([*TRAIN, "--set", "model.widht=3"]) == 2
    out = capsys.readouterr().out
    assert "unknown config key 'model.widht'" in out and "model.d_model" in out and "Traceback" not in out
    assert main([*TRAIN, "--set", "model.d_model=abc"]) == 2
    assert "model.d_model='abc'" in capsys.readouterr().out


def test_a_bad_config_json_is_a_config_error(tmp_path, capsys):
    """A run's config.json is a config, not task data: unreadable or invalid, it raises ConfigError naming it."""
    from dyntrm.config import ConfigError, load_config

    path = tmp_path / "config.json"
    path.write_text('{"model": {"d_model": 32,}}')
    with pytest.raises(ConfigError, match=r"config.json: invalid JSON at line 1, column 26"):
        load_config(path)
    path.write_text('[1, 2]')
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_config(path)
    path.write_text('{"model": {"widht": 3}}')
    with pytest.raises(ConfigError, match="unknown config key 'model.widht'"):
        load_config(path)
    assert main(["train", "--resume", str(tmp_path)]) == 2  # a user error: one line, no traceback
    assert "unknown config key 'model.widht'" in capsys.readouterr().out


def test_leaky_split_configuration_is_refused(capsys, tmp_path):
    assert main(["train", "--preset", "debug", "--source", str(TASKS), "--set", "data.train_splits=all",
                 "--set", "data.eval_split=all", "--out", str(tmp_path)]) == 2
    assert "would be trained on" in capsys.readouterr().out


def test_train_then_eval_predict_inspect_plot_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TRAIN, "--out", str(run), "--set", "train.steps=3"]) == 0
    assert (run / "checkpoints" / "step_0000003" / "model.safetensors").exists()

    assert main(["eval", str(run), "--views", "2", "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(metrics) >= {"pass@1", "pass@2", "tasks", "mean_steps", "decode_tokens_per_s"}
    assert len(metrics["tasks"]) == 6
    sub = json.loads((tmp_path / "ev" / "submission.json").read_text())
    assert set(sub) == set(metrics["tasks"]) and all(set(e[0]) == {"attempt_1", "attempt_2"} for e in sub.values())
    assert "<table" in (tmp_path / "ev" / "report.html").read_text()

    answers = tmp_path / "answers.json"
    assert main(["predict", str(run), str(TASKS / "flip_lr.json"), "--views", "1", "--out", str(answers)]) == 0
    assert list(json.loads(answers.read_text())) == ["flip_lr"]
    assert "pass@2" in capsys.readouterr().out  # the file has test outputs, so it is scored

    assert main(["inspect", str(run), str(TASKS), "identity", "--out", str(tmp_path / "ins")]) == 0
    assert {p.name for p in (tmp_path / "ins").iterdir()} >= {"routing.png", "halting.png", "answer.png"}
    assert main(["plot", str(run)]) == 0
    assert (run / "plots" / "curves.png").exists() and (run / "plots" / "usage.png").exists()

    # resume continues the same run to a larger step count
    assert main(["train", "--resume", str(run), "--set", "train.steps=5"]) == 0
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert steps[-1] == 5


def test_eval_of_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().out


def test_torchrun_two_processes_end_to_end(tmp_path):
    """`torchrun --nproc_per_node 2 -m dyntrm train` on CPU (gloo): trains, saves, and exits cleanly."""
    import subprocess
    import sys

    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dyntrm",
           *TRAIN, "--out", str(run), "--set", "train.steps=4", "--set", "data.tokens_per_batch=512",
           "--set", "train.log_every=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "terminate called" not in proc.stderr
    assert (run / "checkpoints" / "step_0000004" / "model.safetensors").exists()
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if l["kind"] == "train"] == [1, 2, 3, 4]  # rank 0 alone writes metrics


def test_demo_end_to_end_on_the_debug_preset(tmp_path, capsys, monkeypatch):
    """`make demo`'s job with the `debug` model on the hand-made tasks: trains, evaluates with 1 and 2 views, and
    writes a report holding the scores, the diagnostics and the copy-the-input reference."""
    import dyntrm.cli as cli
    from helpers import debug_cfg

    monkeypatch.setattr(cli, "demo_config", lambda minutes: debug_cfg("train.steps=3", "train.log_every=1"))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--views", "1", "2"]) == 0
    text = capsys.readouterr().out
    assert "1 view(s): pass@1" in text and "2 view(s): pass@1" in text and "right shape" in text
    assert "reference, answering each test input with itself: pass@2" in text
    from dyntrm.data.dataset import split_items
    from dyntrm.scoring import copy_input_reference

    expected = copy_input_reference(split_items(cli.demo_config(0)))  # the demo's items, scored independently
    for views in (1, 2):
        m = json.loads((out / f"eval-{views}view" / "metrics.json").read_text())
        assert m["reference_copy_input"] == pytest.approx(expected)
        assert m["n_test_inputs"] == len(split_items(cli.demo_config(0)))
    report = (out / "report.html").read_text()
    assert "answering with the test input" in report and "pass@2 (2 views)" in report
    # scores without and with test-time training side by side (its default steps on the demo)
    assert "2 view(s), TTT: pass@1" in text and "without TTT |" in report and "answers TTT changed" in report
    assert json.loads((out / "eval-2view-ttt" / "metrics.json").read_text())["ttt_tasks"] == 6
