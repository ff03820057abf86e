"""Training-recipe switches (issue 11) against independent references."""

import pytest
import torch

from dyntrm.config import ConfigError, apply_overrides, preset
from dyntrm.model import ArcTransformer
from helpers import debug_cfg


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["dyn", "dense"])
def test_truncated_recursion_equals_full_bptt_with_the_state_detached(variant):
    """detach_steps=d runs the first d steps without a graph; the reference runs every step *with* a graph and
    detaches the state entering step d: same values, same gradients of a loss on steps d..N."""
    cfg = debug_cfg(f"model.variant={variant}", "model.input_injection=true", "model.max_steps=4").model
    torch.manual_seed(0)
    model = ArcTransformer(cfg).double()
    tokens = torch.randint(0, 17, (3, 11))
    d = 2

    out = model(tokens, detach_steps=d)
    assert out.grad_from == d and out.logits.shape[0] == 4
    got = _grads(model, out.logits[d:].square().mean())

    # the state entering step d is detached *before* input injection re-adds x0, which keeps its graph
    real_step = model.step
    model.step = lambda x, x0, s, ctx: real_step(x.detach() if s == d else x, x0, s, ctx)
    ref = model(tokens)
    torch.testing.assert_close(out.logits, ref.logits)
    want = _grads(model, ref.logits[d:].square().mean())
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-10, atol=1e-12, msg=name)
    assert got["embed.weight"].abs().sum() > 0  # input injection: the embeddings still learn


def test_training_with_truncation_trains_only_the_last_steps(monkeypatch):
    from dyntrm.runtime import Runtime
    from dyntrm.train import Trainer

    tr = Trainer(debug_cfg("train.grad_steps=1", "model.input_injection=true", "shaping.kind=sars",
                           "shaping.token_rate=1"), Runtime(torch.device("cpu")))
    seen = []
    real = tr.shaper.observe
    monkeypatch.setattr(tr.shaper, "observe", lambda routed: (seen.append(routed.step), real(routed))[1])
    stream = tr.data.iterate()
    m = tr.step(tr.micro_batches(stream)[0])
    assert set(seen) == {tr.cfg.model.max_steps - 1}  # SARS captures the trained step only
    assert m["loss"] == m["loss"] and m["lm"] > 0


def test_truncation_without_input_injection_is_refused():
    with pytest.raises(ConfigError, match="needs model.input_injection=true"):
        apply_overrides(preset("debug"), ["train.grad_steps=1", "model.input_injection=false"])
    apply_overrides(preset("debug"), ["train.grad_steps=3", "model.input_injection=false"])  # all steps: nothing is truncated
