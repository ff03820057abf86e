"""Self-organisation measures: mutual information by hand, and a routing profile of a real (debug) model."""

import math

import numpy as np

from dyntrm.analysis import entropy_bits, mutual_information, routing_profile
from dyntrm.train import Trainer
from helpers import CPU, debug_cfg


def test_mutual_information_by_hand():
    x = np.array([0, 0, 1, 1])
    assert mutual_information(x, x) == entropy_bits(x) == 1.0  # a variable with itself: its entropy
    assert mutual_information(x, np.array([0, 1, 0, 1])) == 0.0  # independent
    # y = x for half the rows, constant otherwise: I = H(Y) - H(Y|X), worked out by hand
    x = np.array([0, 1, 0, 1])
    y = np.array([0, 1, 0, 0])
    h_y = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    h_y_given_x = 0.5 * 0 + 0.5 * 1.0  # x=0 -> y=0 always; x=1 -> y uniform on {0, 1}
    assert math.isclose(mutual_information(x, y), h_y - h_y_given_x)


def test_routing_profile_of_a_debug_model():
    tr = Trainer(debug_cfg(), CPU)
    plan = tr.data.epoch(0)
    batches = [plan.batch(i, tr.data.items) for i in range(len(plan))]
    prof = routing_profile(tr.model, batches)
    real = sum(b.n_tokens for b in batches)
    steps, heads = tr.cfg.model.max_steps, tr.cfg.model.n_heads
    assert prof["ffn_rows"] == real * steps and prof["q_rows"] == real * steps * heads
    for kind in ("q", "k", "v", "ffn"):
        assert 0 <= prof[f"{kind}_mi_task_bits"] <= prof[f"{kind}_choice_entropy_bits"] + 1e-9
        assert 1 <= prof[f"{kind}_experts_in_use"]
    # routing reads the token's own embedding through the residual stream: its choice carries colour information
    assert prof["ffn_mi_colour_bits"] > 0
