"""Checkpoints that do not load: a truncated or corrupt file (the newest checkpoint is passed over for the next
one that loads, and the user is told), a pickle that is more than tensors (refused, never run), weights of
another model, and evaluation that needs no optimizer state."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dyntrm import checkpoint
from dyntrm.model import ArcTransformer
from dyntrm.train import train
from helpers import CPU, TASKS, assert_user_error, cli, debug_cfg

CFG = ("train.steps=3", "train.save_every=1", "train.keep=3")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with checkpoints at steps 1, 2 and 3 (copied afresh for every test: they break it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(debug_cfg(*CFG), run, rt=CPU, live=False)
    return run


@pytest.fixture
def run(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "run")


def step_dir(run, step):
    return run / "checkpoints" / f"step_{step:07d}"


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BREAKS = {
    "model.safetensors truncated": lambda d: truncate(d / "model.safetensors"),
    "ema.safetensors truncated": lambda d: truncate(d / "ema.safetensors"),
    "model.safetensors missing": lambda d: (d / "model.safetensors").unlink(),
    "meta.json truncated": lambda d: truncate(d / "meta.json"),
    "meta.json a list": lambda d: (d / "meta.json").write_text("[1, 2]"),
    "meta.json config holding a list": lambda d: (d / "meta.json").write_text(
        json.dumps({**json.loads((d / "meta.json").read_text()), "config": {"model": [1]}})),
    "state.pt truncated": lambda d: truncate(d / "state.pt"),
}


@pytest.mark.parametrize("how", BREAKS)
def test_a_broken_newest_checkpoint_is_passed_over_for_the_one_before(run, how, capsys):
    BREAKS[how](step_dir(run, 3))
    file = how.split()[0]
    warnings = []
    ck = checkpoint.load(run, warn=warnings.append)
    assert ck["meta"]["step"] == 2
    assert len(warnings) == 1 and file in warnings[0] and "step_0000002" in warnings[0]
    # resume goes on from step 2, saying so on stderr
    code, out, err = cli(capsys, "train", "--resume", run, "--set", "train.steps=4")
    assert code == 0 and file in err and "step_0000002" in err, err
    assert checkpoint.load(run)["meta"]["step"] == 4
    assert checkpoint.read(step_dir(run, 3))["meta"]["step"] == 3  # the broken one was saved again, not kept


def test_evaluation_passes_over_a_broken_checkpoint_and_needs_no_optimizer_state(run, capsys):
    for step in (1, 2, 3):
        (step_dir(run, step) / "state.pt").unlink()  # evaluation reads weights only
    _, _, d = checkpoint.load_model(run, warn=pytest.fail)
    assert d == step_dir(run, 3)
    truncate(step_dir(run, 3) / "ema.safetensors")
    warnings = []
    _, _, d = checkpoint.load_model(run, warn=warnings.append)
    assert d == step_dir(run, 2) and "ema.safetensors" in warnings[0]
    code, out, err = cli(capsys, "predict", run, TASKS / "flip_lr.json", "--views", "1", "--out", run / "a.json")
    assert code == 0 and "ema.safetensors: truncated or corrupt" in err and "using step_0000002" in err


def test_with_no_checkpoint_that_loads_the_error_names_the_newest_file(run, capsys):
    for step in (1, 2, 3):
        truncate(step_dir(run, step) / "model.safetensors")
    for argv in (["eval", run], ["train", "--resume", run], ["predict", run, TASKS / "flip_lr.json"]):
        assert_user_error(cli(capsys, *argv), str(step_dir(run, 3) / "model.safetensors"), "truncated or corrupt",
                          "no older checkpoint loads either")
    # a checkpoint named directly is that one or an error, never another
    assert_user_error(cli(capsys, "eval", step_dir(run, 2)), str(step_dir(run, 2) / "model.safetensors"))


def test_a_pickle_that_is_more_than_tensors_is_refused_in_one_line(run, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    state = step_dir(run, 3) / "state.pt"
    torch.save({"optimizer": Evil()}, state)
    with pytest.raises(checkpoint.RefusedPickle):
        checkpoint.load(run)  # not passed over for step 2: a planted file is not an accident
    code, out, err = cli(capsys, "train", "--resume", run)
    assert_user_error((code, out, err), f"refusing to unpickle {state}: not a plain tensor checkpoint")
    assert "weights_only" not in err and "pwned" not in out + err


def test_weights_of_another_width_are_a_one_line_error(run, capsys):
    wide = ArcTransformer(debug_cfg("model.d_model=64").model).state_dict()
    for name in ("model", "ema"):
        save_file({k: v.contiguous() for k, v in wide.items()}, str(step_dir(run, 3) / f"{name}.safetensors"))
    assert_user_error(cli(capsys, "eval", run), str(step_dir(run, 3) / "ema.safetensors"), "weights of another model")
    assert_user_error(cli(capsys, "train", "--resume", run), str(step_dir(run, 3) / "model.safetensors"),
                      "weights of another model")
