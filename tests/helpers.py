"""Shared test set-up: the tiny hand-made tasks and a `debug` config that trains on them in seconds."""

from pathlib import Path

import torch

from dyntrm.config import apply_overrides, preset
from dyntrm.runtime import Runtime

ASSETS = Path(__file__).parent / "assets"
TASKS = ASSETS / "tasks"
CPU = Runtime(torch.device("cpu"))


def debug_cfg(*overrides: str):
    """`debug` on tests/assets/tasks: their demonstrations train, their test inputs are scored."""
    cfg = preset("debug")
    return apply_overrides(cfg, [
        f"data.source={TASKS}", "data.train_splits=", "data.demo_splits=all", "data.eval_split=all",
        "data.tokens_per_batch=512", "data.max_len=512", "train.steps=6", "train.warmup=2", "train.log_every=1",
        "train.save_every=0", "train.lr=3e-3", *overrides,
    ])


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_close_by_norm(got: torch.Tensor, want: torch.Tensor, rel: float, msg: str = "") -> None:
    """``‖got − want‖ ≤ rel · ‖want‖`` (plus a floor of 1e-12 for all-zero tensors).

    Float results that depend on the summation order (another processor's BLAS, gloo's all-reduce, accumulation
    over micro-batches) agree to a small fraction of the tensor's *norm*, not element by element: a near-zero
    element can differ by 10% of itself. Element-wise atol/rtol comparisons of such results are red on some
    machines; this one is not, and still fails on any real difference (a wrong normalisation, a missing term)."""
    got, want = got.double(), want.double()
    err, ref = torch.linalg.vector_norm(got - want).item(), torch.linalg.vector_norm(want).item()
    assert err <= rel * ref + 1e-12, f"{msg}: |got - want| = {err:.3g} > {rel:g} x |want| = {rel * ref:.3g}"


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``dyntrm ARGV`` in-process: (exit code, stdout, stderr)."""
    from dyntrm.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse refuses bad arguments this way
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_user_error(result: tuple[int, str, str], *phrases: str) -> None:
    """A user's mistake: exit code 2 and one line on stderr, ``error: ...`` holding every phrase; no traceback,
    nothing about it on stdout."""
    code, out, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}; stderr: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line on stderr: {err[-2000:]!r}"
    assert "Traceback" not in out + err and "error" not in out, out[-2000:]
    for p in phrases:
        assert p in lines[0], f"{p!r} not in {lines[0]!r}"
