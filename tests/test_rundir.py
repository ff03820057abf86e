"""A run directory belongs to one run: a new run into an existing one is refused without --resume or --overwrite,
a second writer at the same time is refused by the lock, and what a killed save left behind is removed."""

import json
import socket
import subprocess
import sys

from dyntrm import checkpoint
from helpers import TASKS, assert_user_error, cli

TRAIN = ["train", "--preset", "debug", "--source", TASKS, "--set", "data.train_splits=", "--set",
         "data.demo_splits=all", "--set", "data.eval_split=all", "--set", "train.warmup=1", "--set", "train.steps=2",
         "--set", "train.log_every=1"]


def train_steps(run):
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["step"] for r in records if r["kind"] == "train"]


def test_a_new_run_into_an_existing_one_needs_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, *TRAIN, "--out", run)[0] == 0
    old = checkpoint.load(run)["model"]
    config = (run / "config.json").read_text()
    (run / "eval-all").mkdir()  # an evaluation of the old weights
    assert_user_error(cli(capsys, *TRAIN, "--out", run, "--set", "train.seed=1"), f"{run} holds a run already",
                      f"--resume {run}", "--overwrite")
    assert (run / "config.json").read_text() == config and not (run / ".lock").exists()
    code, out, err = cli(capsys, *TRAIN, "--out", run, "--set", "train.seed=1", "--overwrite")
    assert code == 0 and "deleted the old run's" in err, err
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 1
    assert train_steps(run) == [1, 2] and not (run / "eval-all").exists()  # nothing of the old run is left
    new = checkpoint.load(run)["model"]
    assert any(not (old[k] == new[k]).all() for k in old)  # the new run's weights, not the old ones
    assert not (run / ".lock").exists()


def test_conflicting_or_impossible_targets_are_refused(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert_user_error(cli(capsys, *TRAIN, "--out", a_file), str(a_file), "not a run directory")
    assert_user_error(cli(capsys, "train", "--resume", tmp_path, "--overwrite"), "--overwrite")
    assert_user_error(cli(capsys, "train", "--resume", tmp_path, "--out", tmp_path / "other"), "--out")


def test_a_second_writer_is_refused_while_the_first_lives(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, *TRAIN, "--out", run)[0] == 0
    before = params_of(run)
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        lock = f"{live.pid} {socket.gethostname()}\n"  # as a running `dyntrm train` leaves it
        (run / ".lock").write_text(lock)
        for argv in ([*TRAIN, "--out", run, "--overwrite"], ["train", "--resume", run, "--set", "train.steps=3"]):
            assert_user_error(cli(capsys, *argv), f"process {live.pid}", str(run / ".lock"))
        assert (run / ".lock").read_text() == lock and params_of(run) == before
        (run / ".lock").write_text("1 another-machine\n")  # whose processes cannot be looked up from here
        assert_user_error(cli(capsys, "train", "--resume", run), "process 1 on another-machine")
        (run / ".lock").write_text(lock)
    finally:
        live.communicate(b"")
    # its process gone, the lock is stale: the next writer takes it over, says so, and releases it at exit
    code, out, err = cli(capsys, "train", "--resume", run, "--set", "train.steps=3")
    assert code == 0 and f"process {live.pid}" in err and "taking the run over" in err, err
    assert not (run / ".lock").exists() and train_steps(run) == [1, 2, 3]


def params_of(run):
    return {k: v.tolist() for k, v in checkpoint.load(run)["model"].items()}


def test_leftovers_of_a_killed_save_are_removed_at_the_next_start(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, *TRAIN, "--out", run)[0] == 0
    ckpts = run / "checkpoints"
    leftovers = [ckpts / ".tmp_step_0000003_4242", ckpts / ".latest.k2j3h4.tmp", run / ".config.json.a1b2.tmp"]
    leftovers[0].mkdir()
    (leftovers[0] / "model.safetensors").write_bytes(b"half")
    for f in leftovers[1:]:
        f.write_text("half")
    code, out, err = cli(capsys, "train", "--resume", run, "--set", "train.steps=3")
    assert code == 0 and "3 leftovers" in err, err
    assert not any(p.exists() for p in leftovers)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000002", "step_0000003"]


def test_run_files_follow_the_umask(tmp_path, capsys):
    """Not mode 0600 whatever the umask (a temporary file from mkstemp, safetensors' own writer)."""
    import os

    old = os.umask(0o027)
    try:
        run = tmp_path / "run"
        assert cli(capsys, *TRAIN, "--out", run)[0] == 0
        assert cli(capsys, "eval", run, "--views", "1", "--limit", "1", "--cap-to-prompt")[0] == 0
    finally:
        os.umask(old)
    modes = {str(p.relative_to(run)): p.stat().st_mode & 0o777 for p in [run, *run.rglob("*")]}
    want = {k: 0o750 if (run / k).is_dir() else 0o640 for k in modes}
    assert modes == want and "checkpoints/step_0000002/model.safetensors" in modes and "eval-all/metrics.json" in modes
