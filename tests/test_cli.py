"""The command line end to end on the `debug` preset: train -> eval / predict / inspect / plot, errors."""

import json
import os
import re

import pytest
import torch

from dyntrm.cli import main
from helpers import TASKS, assert_user_error, cli

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
    err = capsys.readouterr().err
    assert "unknown config key 'model.widht'" in err and "model.d_model" in err and "Traceback" not in err
    assert_user_error(cli(capsys, *TRAIN, "--set", "model.d_model=abc"), "model.d_model='abc'")


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
    assert main(["train", "--resume", str(tmp_path)]) == 2  # a user error, on stderr, no traceback
    assert "unknown config key 'model.widht'" in capsys.readouterr().err


def test_leaky_split_configuration_is_refused(capsys, tmp_path):
    assert_user_error(cli(capsys, "train", "--preset", "debug", "--source", TASKS, "--set", "data.train_splits=all",
                          "--set", "data.eval_split=all", "--out", tmp_path), "would be trained on")


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

    # --init fine-tunes a new run from the checkpoint's weights and config (a --set changes its data or schedule)
    ft = tmp_path / "ft"
    assert main(["train", "--init", str(run), "--out", str(ft), "--set", "train.steps=2"]) == 0
    cfg = json.loads((ft / "config.json").read_text())
    assert cfg["train"]["init"] == str((run / "checkpoints" / "step_0000005").resolve())  # pinned: that very step
    assert cfg["train"]["steps"] == 2 and cfg["model"] == json.loads((run / "config.json").read_text())["model"]
    assert main(["train", "--init", str(run), "--resume", str(ft)]) == 2  # user errors: one or the other,
    assert main(["train", "--init", str(run), "--preset", "tiny", "--out", str(tmp_path / "x")]) == 2  # no preset


def test_eval_with_joint_test_time_training_fine_tunes_on_demonstrations_only(tmp_path, capsys, monkeypatch):
    import dyntrm.evaluate
    from dyntrm.checkpoint import load_model

    run = tmp_path / "run"
    assert main([*TRAIN, "--out", str(run), "--set", "train.steps=2"]) == 0
    out = tmp_path / "ev"
    answered_by = []  # the model that answers: the joint fine-tune's, not the checkpoint's
    real_run_eval = dyntrm.evaluate.run_eval
    monkeypatch.setattr(dyntrm.evaluate, "run_eval",
                        lambda model, *a, **kw: answered_by.append(model) or real_run_eval(model, *a, **kw))
    assert main(["eval", str(run), "--views", "1", "--ttt-steps", "0", "--ttt-joint-minutes", "0.02",
                 "--out", str(out)]) == 0
    (model,) = answered_by
    weights = model.state_dict()
    for other, same in ((load_model(out / "joint" / "run")[0], True), (load_model(run)[0], False)):
        assert same == all(torch.equal(weights[k], v) for k, v in other.state_dict().items())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ttt_joint_seconds"] > 0 and len(metrics["tasks"]) == 6
    written = json.loads((out / "joint" / "demonstrations.json").read_text())  # one bundle: ids are keys
    assert len(written) == 6
    for tid, task in written.items():  # the demonstrations in full, the test inputs bare: no test output enters
        original = json.loads((TASKS / f"{tid}.json").read_text())
        assert task["train"] == original["train"]
        assert task["test"] == [{"input": t["input"]} for t in original["test"]]
    ft = json.loads((out / "joint" / "run" / "config.json").read_text())
    assert ft["train"]["init"] == str((run / "checkpoints" / "step_0000002").resolve())  # the checkpoint evaluated
    assert ft["data"]["demo_splits"] == ["all"] and not ft["data"]["train_splits"]
    assert_user_error(cli(capsys, "eval", run, "--ttt-joint-minutes", "-1"), "--ttt-joint-minutes")


def test_eval_of_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert_user_error(cli(capsys, "eval", tmp_path), "no complete checkpoint")


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


@pytest.mark.slow  # two demos, about 20 s on 2 cores
@pytest.mark.parametrize("variant", ["dyn", "dynmoe"])
def test_demo_end_to_end_on_the_debug_preset(tmp_path, capsys, monkeypatch, variant):
    """`make demo`'s job with the `debug` model on the hand-made tasks: trains, evaluates with 1 and 2 views, and
    writes a report holding the scores, the diagnostics and the copy-the-input reference. Both libraries, and the
    FFN library only (the recipe's variant: no attention routing to plot)."""
    import dyntrm.cli as cli
    from helpers import debug_cfg

    monkeypatch.setattr(cli, "demo_config", lambda minutes: debug_cfg("train.steps=3", "train.log_every=1",
                                                                      f"model.variant={variant}"))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--views", "1", "2"]) == 0
    text = capsys.readouterr().out
    assert "1 view(s): pass@1" in text and "2 view(s): pass@1" in text and "right shape" in text
    assert "reference, answering each test input with itself: pass@2" in text
    from dyntrm.data.dataset import split_items
    from dyntrm.scoring import copy_input_reference

    cfg = cli.demo_config(0)
    items = split_items(cfg, max_side=cfg.data.max_side)  # the demo's items: its tasks within its max_side
    expected = copy_input_reference(items)  # scored independently
    for views in (1, 2):
        m = json.loads((out / f"eval-{views}view" / "metrics.json").read_text())
        assert m["reference_copy_input"] == pytest.approx(expected)
        assert m["n_test_inputs"] == len(items)
    report = (out / "report.html").read_text()
    assert "answering with the test input" in report and "pass@2 (2 views)" in report
    # scores without and with test-time training side by side (its default steps on the demo)
    assert "2 view(s), TTT: pass@1" in text and "without TTT |" in report and "answers TTT changed" in report
    assert json.loads((out / "eval-2view-ttt" / "metrics.json").read_text())["ttt_tasks"] == 6
    # a second demo into the same directory replaces the first one's run (run directories belong to one run)
    assert main(["demo", "--out", str(out), "--views", "1"]) == 0
    assert not (out / "eval-2view").exists() and "pass@2 (2 views)" not in (out / "report.html").read_text()


def test_errors_go_to_stderr_as_one_line_even_when_they_look_like_markup(tmp_path, capsys):
    """A message holding ``[...]`` (a pair such as train[0], a file name such as [red]bad.json) prints as it is."""
    bad = tmp_path / "[red]bad.json"
    bad.write_text('{"train": [{"input": [[1]], "output": [[1, 2], [3]]}], "test": [{"input": [[1]]}]}')
    assert_user_error(cli(capsys, "show", bad, "x", "--out", tmp_path / "x.png"), "[red]bad.json", "train[0].output")


@pytest.mark.parametrize("argv,words", [
    (["eval", "RUN", "--views", "0"], "argument --views: must be >= 1, got 0"),
    (["eval", "RUN", "--limit", "-1"], "argument --limit: must be >= 1, got -1"),
    (["eval", "RUN", "--temperature", "-1"], "argument --temperature: must be >= 0, got -1"),
    (["eval", "RUN", "--temperature", "nan"], "argument --temperature"),
    (["eval", "RUN", "--top-k", "-1"], "argument --top-k"),
    (["eval", "RUN", "--seed", "-1"], "argument --seed"),
    (["eval", "RUN", "--views", "two"], "argument --views: expected an integer, got 'two'"),
    (["predict", "RUN", "task.json", "--views", "0"], "argument --views"),
    (["demo", "--minutes", "0"], "argument --minutes: must be > 0"),
    (["demo", "--views", "1", "0"], "argument --views"),
    (["data", "stats", "--max-len", "0"], "argument --max-len"),
    (["data", "synth", "--out", "x", "--tasks", "-1"], "argument --tasks"),
    (["info", "--context", "0"], "argument --context"),
    (["eval"], "required: RUN_DIR_OR_CHECKPOINT"),
])
def test_bad_arguments_are_one_line_errors(capsys, argv, words):
    assert_user_error(cli(capsys, *argv), words, f"dyntrm {argv[0]}")


def test_eval_of_a_split_the_source_lacks_is_refused(tmp_path, capsys):
    """A flat task directory has one split, `all`: the run's default split falls back to it, a split the user
    names does not."""
    run = tmp_path / "run"
    assert main([*TRAIN, "--out", str(run), "--set", "train.steps=1"]) == 0
    assert_user_error(cli(capsys, "eval", run, "--split", "nope", "--out", tmp_path / "ev"), "no split 'nope'",
                      "['all']")
    assert not (tmp_path / "ev").exists()


@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    """A 3-step debug run that tests read but never change."""
    run = tmp_path_factory.mktemp("run3") / "run"
    assert main([*TRAIN, "--out", str(run), "--set", "train.steps=3"]) == 0
    return run


def _no_decoding(monkeypatch):
    import dyntrm.evaluate as E

    def refuse(*a, **k):
        raise AssertionError("decoding started before the output path was checked")

    monkeypatch.setattr(E, "generate_batched", refuse)


def test_eval_and_predict_check_where_they_write_before_decoding(run3, tmp_path, capsys, monkeypatch):
    _no_decoding(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert_user_error(cli(capsys, "eval", run3, "--out", a_file), str(a_file), "not a directory")
    assert_user_error(cli(capsys, "eval", run3, "--out", a_file / "sub"), str(a_file))
    assert_user_error(cli(capsys, "predict", run3, TASKS / "flip_lr.json", "--out", tmp_path), str(tmp_path),
                      "is a directory")
    assert_user_error(cli(capsys, "predict", run3, TASKS / "flip_lr.json", "--out", a_file / "x.json"), str(a_file))


def test_eval_and_predict_refuse_a_read_only_output_before_decoding(run3, tmp_path, capsys, monkeypatch):
    _no_decoding(monkeypatch)
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    if os.access(read_only, os.W_OK):  # root writes anywhere: nothing to refuse
        pytest.skip("running as root: a read-only directory is writable")
    assert_user_error(cli(capsys, "eval", run3, "--out", read_only / "ev"), str(read_only), "Permission denied")
    assert_user_error(cli(capsys, "predict", run3, TASKS / "flip_lr.json", "--out", read_only / "x.json"),
                      str(read_only), "Permission denied")


def test_a_full_disk_is_a_one_line_error_saying_so(tmp_path, capsys, monkeypatch):
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert_user_error(cli(capsys, *TRAIN, "--out", tmp_path / "run", "--set", "train.steps=1"), "disk full",
                      str(tmp_path / "run"))


@pytest.fixture
def short_model(tmp_path):
    """A run whose model answers prompts of at most 24 tokens, trained (never) on grids of at most 2x2, and three
    tasks: `a` fits, `b` fits without its demonstration, `c`'s 5x5 test input alone is 32 tokens."""
    from dyntrm import checkpoint
    from dyntrm.config import apply_overrides, preset
    from dyntrm.model import ArcTransformer

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    sq = lambda side, c=1: [[c] * side] * side  # noqa: E731
    for name, demo, query in (("a", sq(2), sq(2)), ("b", sq(3), sq(2)), ("c", sq(1), sq(5, 3))):
        (tasks / f"{name}.json").write_text(json.dumps({"train": [{"input": demo, "output": demo}],
                                                        "test": [{"input": query, "output": sq(1)}]}))
    cfg = apply_overrides(preset("debug"), [f"data.source={tasks}", "data.eval_split=all", "data.max_side=2",
                                            "data.max_len=24", "data.tokens_per_batch=64",
                                            "model.max_positions=956", "model.size_header=false",
                                            "model.grid_coords=off", "model.dihedral_cells=false"])  # token counts of the plain serialisation
    run = tmp_path / "run"
    model = ArcTransformer(cfg.model)
    checkpoint.save(run, 1, model_state=model.state_dict(), ema_state=None, state={},
                    meta=checkpoint.meta_for(cfg, train_state={}))
    return run, tasks


def test_predict_answers_a_long_prompt_with_fewer_demonstrations_and_refuses_one_too_long(short_model, tmp_path,
                                                                                          capsys, monkeypatch):
    run, tasks = short_model
    code, out, err = cli(capsys, "predict", run, tasks / "b.json", "--views", "1", "--out", tmp_path / "b.json")
    assert code == 0 and "task b test 0: its prompt of 33 tokens is over the 24 this model answers" in err
    assert "answered from 0 of 1 demonstrations" in err and list(json.loads((tmp_path / "b.json").read_text())) == ["b"]
    _no_decoding(monkeypatch)
    assert_user_error(cli(capsys, "predict", run, tasks / "c.json", "--out", tmp_path / "c.json"),
                      "task c test 0: even without demonstrations its prompt is 32 tokens, over the 24")
    assert not (tmp_path / "c.json").exists()


def test_eval_answers_every_task_of_the_split_and_counts_what_did_not_fit(short_model, tmp_path, capsys):
    """Tasks over the run's data.max_side (b, c) stay in the submission; c, too long even alone, is answered with
    its test input."""
    run, tasks = short_model
    code, out, err = cli(capsys, "eval", run, "--views", "1", "--cap-to-prompt", "--out", tmp_path / "ev")
    assert code == 0, err
    assert "1 prompts too long for the model lost demonstrations" in out and "1 test inputs too long" in out
    sub = json.loads((tmp_path / "ev" / "submission.json").read_text())
    assert sorted(sub) == ["a", "b", "c"] and sub["c"] == [{"attempt_1": [[3] * 5] * 5, "attempt_2": [[3] * 5] * 5}]
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert (m["n_test_inputs"], m["prompts_shortened"], m["too_long"]) == (3, 1, 1)
