"""The model against independent references: per-expert loops, naive attention, full recomputes (float64)."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dyntrm.config import preset
from dyntrm.model import ArcTransformer, ExpertLibrary, ExpertMLP
from dyntrm.model.context import AttnMask, StepContext
from dyntrm.model.layers import Rope, apply_rope

torch.set_default_dtype(torch.float32)

VARIANTS = ["dyn", "dense", "dynsiha", "dynmoe"]  # model.variant: both halves routed, neither, attention, FFN


def model_cfg(**kw):
    cfg = preset("debug").model
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def make(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return ArcTransformer(model_cfg(**kw)).to(dtype)


# ---------------------------------------------------------------------------------------------- libraries

def _library(E=5, d_in=6, hid=7, d_out=4, seed=0):
    torch.manual_seed(seed)
    mlps = [ExpertMLP(d_in, hid, d_out).double() for _ in range(E)]
    lib = ExpertLibrary(E, d_in, hid, d_out).double()
    lib.load_experts(mlps)
    return lib, mlps


def test_library_equals_per_expert_modules():
    lib, mlps = _library()
    x = torch.randn(11, 6, dtype=torch.float64)
    out_END = lib.dense(x)
    for e, m in enumerate(mlps):
        torch.testing.assert_close(out_END[e], m(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(lib.expert(e, x), m(x), rtol=0, atol=1e-12)
    # grouped: rows sorted by expert, including an expert with no rows
    counts = torch.tensor([3, 0, 4, 1, 3])
    got = lib.grouped(x, counts)
    e_of_row = torch.repeat_interleave(torch.arange(5), counts)
    ref = torch.stack([mlps[e](x[i]) for i, e in enumerate(e_of_row.tolist())])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def _compose_reference(mlps, x, w):
    """Σ_e w[:, c, e] · Expert_e(x) by a loop over plain modules: (N, C, d_out)."""
    return torch.stack([sum(w[:, c, e:e + 1] * m(x) for e, m in enumerate(mlps)) for c in range(w.shape[1])], 1)


def _assert_grads_match_modules(got_grads, ref_grads, n_experts):
    """(dx, dw, dw1, dw2) of a library against (dx, dw, per-module weight grads) of the reference loop."""
    torch.testing.assert_close(got_grads[0], ref_grads[0])
    torch.testing.assert_close(got_grads[1], ref_grads[1])
    for e in range(n_experts):
        torch.testing.assert_close(got_grads[2][e], ref_grads[2 + 2 * e].T)
        torch.testing.assert_close(got_grads[3][e], ref_grads[3 + 2 * e].T)


@pytest.mark.parametrize("path,chunk", [("experts", 4), ("experts", None), ("manual", 4), ("manual", None),
                                        ("gemm", 4), ("gemm", None)])
def test_compose_equals_per_expert_loop_with_gradients(path, chunk):
    """Every CPU composition path, in several row chunks and in one, values and gradients (float64)."""
    lib, mlps = _library(seed=1)
    x = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    w = torch.relu(torch.randn(11, 3, 5, dtype=torch.float64)).requires_grad_()  # zeros included
    got = lib.compose(x, w, chunk=chunk, path=path)
    ref = _compose_reference(mlps, x, w)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    with torch.no_grad():  # inference: the same values (the manual path then keeps no activations)
        torch.testing.assert_close(lib.compose(x, w, chunk=chunk, path=path), ref, rtol=0, atol=1e-12)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, [x, w, lib.w1, lib.w2], g)
    params = [p for m in mlps for p in (m.w1.weight, m.w2.weight)]
    _assert_grads_match_modules(grads, torch.autograd.grad(ref, [x, w, *params], g), 5)


def test_compose_sparse_equals_dense_composition_and_runs_active_pairs_only(monkeypatch):
    """The sparse composition of the same ReLU routing: equal values and gradients on the rows it computes
    (inactive experts weigh exactly 0; their weights' gradient is cut by the ReLU either way, so gradients are
    compared at the logits), zeros on the rows left out, and only (row, expert) pairs active in some channel."""
    lib, mlps = _library(seed=3)
    x = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    r = torch.randn(13, 3, 5, dtype=torch.float64) - 1.0  # ~16% active per channel
    r[4] = -1.0  # a row with no active expert at all
    r.requires_grad_()
    w = torch.relu(r)
    rows = torch.ones(13, dtype=torch.bool)
    rows[[2, 9]] = False  # e.g. padding
    counts = []
    real = lib.grouped
    monkeypatch.setattr(lib, "grouped", lambda xs, c: (counts.append(c.tolist()), real(xs, c))[1])
    got = lib.compose_sparse(x, w, rows)
    active = ((w != 0).any(1) & rows[:, None]).sum(0).tolist()
    assert counts == [active] and sum(active) < 13 * 5 / 2
    ref = _compose_reference(mlps, x, w) * rows[:, None, None]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert (got[4] == 0).all() and (got[~rows] == 0).all()
    g = torch.randn_like(got)
    params = [p for m in mlps for p in (m.w1.weight, m.w2.weight)]
    grads = torch.autograd.grad(got, [x, r, lib.w1, lib.w2], g, retain_graph=True)  # w feeds both
    _assert_grads_match_modules(grads, torch.autograd.grad(ref, [x, r, *params], g), 5)


def test_grouped_mm_path_equals_loop_in_float32(monkeypatch):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    lib, _ = _library(d_in=8, hid=12, seed=2)  # the kernel needs 16-byte row strides
    lib = lib.float()
    x = torch.randn(11, 8)
    counts = torch.tensor([3, 0, 4, 1, 3])
    seen = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs: (seen.append(offs.tolist()), real(a, b, offs=offs))[1])
    got = lib.grouped(x, counts)
    assert seen == [[3, 3, 7, 8, 11]] * 2  # both GEMMs, expert 1 has an empty group
    monkeypatch.setattr(torch, "_grouped_mm", None)
    monkeypatch.delattr(torch, "_grouped_mm")
    torch.testing.assert_close(got, lib.grouped(x, counts), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- DynSIHA+

def naive_attention(q, k, v):
    """Causal softmax attention by explicit loops. q, k, v: (T, H, d) -> (T, H, d)."""
    T, H, d = q.shape
    out = torch.zeros_like(q)
    for h in range(H):
        for i in range(T):
            s = torch.stack([q[i, h] @ k[j, h] for j in range(i + 1)]) / math.sqrt(d)
            p = torch.softmax(s, 0)
            out[i, h] = sum(p[j] * v[j, h] for j in range(i + 1))
    return out


@pytest.mark.parametrize("shared", [False, True])
def test_dynsiha_equals_naive_loops(shared):
    m = make(seed=2, attn_shared=shared)
    assert (m.block.attn.shared is not None) == shared
    attn, lib = m.block.attn, m.attn_expert_library
    B, T, D = 2, 7, m.cfg.d_model
    H, dh, E = m.cfg.n_heads, m.cfg.d_head, m.cfg.attn_experts
    h = torch.randn(B, T, D, dtype=torch.float64)
    cos, sin = m.rope.prefix(T)
    got, _ = attn(h, lib, StepContext(0, cos, sin, AttnMask(True)))

    ref = torch.zeros(B, T, D, dtype=torch.float64)
    for b in range(B):
        qkv = torch.zeros(3, T, H, dh, dtype=torch.float64)
        for t in range(T):
            for hd in range(H):
                x = h[b, t, hd * dh:(hd + 1) * dh]
                for c in range(3):
                    for e in range(E):
                        r = x @ attn.proto[c, e] / math.sqrt(dh) - attn.gate[c, e]
                        if r > 0:
                            qkv[c, t, hd] += r * lib.expert(e, x)
            if attn.shared is not None:  # model.attn_shared: one linear map of the whole width, split per head
                qkv[:, t] += (attn.shared.weight @ h[b, t]).view(3, H, dh)
        q, k = (apply_rope(qkv[i][None], cos, sin)[0] for i in range(2))
        o = naive_attention(q, k, qkv[2])
        ref[b] = attn.out(o.reshape(T, D))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_rope_scores_depend_on_relative_position_only():
    torch.manual_seed(3)
    rope = Rope(8, max_len=256).double()
    q = torch.randn(1, 1, 1, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def score(m, n):
        cq, sq = rope.at(torch.tensor([[m]]))
        ck, sk = rope.at(torch.tensor([[n]]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    for m, n in [(5, 2), (9, 9), (3, 7)]:
        for shift in (1, 17, 100):
            torch.testing.assert_close(score(m, n), score(m + shift, n + shift))
    assert not torch.allclose(score(5, 2), score(5, 3))  # and the position does matter


def test_rope_is_applied_in_the_model():
    """Shifting every position by k leaves the model's attention unchanged; dropping RoPE would not (the
    earlier public attempt computed position ids and never used them)."""
    m = make(seed=4)
    tokens = torch.randint(0, 17, (1, 12))
    x = m.block.norm1(m.embed(tokens))
    attn, lib = m.block.attn, m.attn_expert_library
    cos, sin = m.rope.prefix(40)
    base, _ = attn(x, lib, StepContext(0, cos[:12], sin[:12], AttnMask(True)))
    shifted, _ = attn(x, lib, StepContext(0, cos[25:37], sin[25:37], AttnMask(True)))
    torch.testing.assert_close(base, shifted, rtol=1e-5, atol=1e-6)  # tables are float32
    ones, zeros = torch.ones_like(cos[:12]), torch.zeros_like(sin[:12])
    no_rope, _ = attn(x, lib, StepContext(0, ones, zeros, AttnMask(True)))
    assert (base - no_rope).abs().max() > 1e-3


def test_sparse_attention_composition_equals_dense_with_the_same_weights(monkeypatch):
    """model.attn_active: the same weights give the same logits, halting and gradients as dense composition on real
    tokens (padding rows are left out: no real query reads them), and the routing sums are means over real
    (token, head, channel) rows."""
    sparse = make(seed=14, attn_active=1.5)
    dense = make(seed=0)
    dense.load_state_dict(sparse.state_dict())
    assert sparse.block.attn.sparse and not dense.block.attn.sparse
    lengths = torch.tensor([11, 6])
    tokens = torch.randint(0, 17, (2, 11))
    mask = torch.arange(11)[None, :] < lengths[:, None]
    records = []
    out_s = sparse(tokens, mask, tap=lambda r: records.append(r) if r.names[0] == "q" else None)
    out_d = dense(tokens, mask)
    real = mask[None, :, :, None].expand_as(out_s.logits)
    torch.testing.assert_close(out_s.logits[real], out_d.logits[real], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_s.q_halt, out_d.q_halt)
    rows = int(mask.sum()) * sparse.cfg.n_heads * 3 * sparse.cfg.max_steps
    w = torch.stack([r.weights[r.valid] for r in records])
    torch.testing.assert_close(out_s.attn_l1, w.sum() / rows)
    torch.testing.assert_close(out_s.attn_active, (w > 0).sum().double() / rows)
    assert out_d.attn_l1 is None and 0 < float(out_s.attn_active) < 4  # of 8: 2 x the target at initialisation
    loss = lambda out: (out.logits * real).pow(2).sum()  # noqa: E731
    gs = torch.autograd.grad(loss(out_s), list(sparse.parameters()), allow_unused=True)  # the halt head: unused
    gd = torch.autograd.grad(loss(out_d), list(dense.parameters()), allow_unused=True)
    for (name, _), a, b in zip(sparse.named_parameters(), gs, gd):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


# ---------------------------------------------------------------------------------------------- DynMoE

def test_dynmoe_sparse_equals_dense_reference_and_skips_inactive_experts(monkeypatch):
    m = make(seed=5, ffn_experts=8, ffn_active=1.5)
    moe, lib = m.block.ffn, m.ffn_expert_library
    h = torch.randn(3, 10, m.cfg.d_model, dtype=torch.float64)
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[2, 6:] = False  # padding never activates an expert
    calls = {}
    real_split = torch.split

    def spy_split(x, counts, *a, **k):  # rows handed to each expert's GEMM
        calls["counts"] = list(counts)
        return real_split(x, counts, *a, **k)

    monkeypatch.setattr(torch, "split", spy_split)
    cos, sin = m.rope.prefix(10)
    got, stats = moe(h, lib, StepContext(0, cos, sin, AttnMask(True), valid))
    monkeypatch.setattr(torch, "split", real_split)

    # independent dense reference: every expert on every token, weighted by ReLU(r), zero on padding
    hf = h.reshape(-1, m.cfg.d_model)
    r = hf @ moe.proto.T / math.sqrt(m.cfg.d_model) - moe.gate
    w = F.relu(r) * valid.reshape(-1, 1)
    ref = sum(w[:, e:e + 1] * lib.expert(e, hf) for e in range(8)).reshape(h.shape)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    active_per_expert = (w > 0).sum(0).tolist()
    assert calls["counts"] == active_per_expert
    assert sum(active_per_expert) < 8 * 30 * 0.5  # genuinely sparse
    # a token with no active expert passes through: its FFN output is exactly zero
    none_active = (w > 0).sum(1) == 0
    assert none_active.any()
    assert (got.reshape(-1, m.cfg.d_model)[none_active] == 0).all()
    torch.testing.assert_close(stats.l1, w.sum())


# ---------------------------------------------------------------------------------------------- the model

def test_causality():
    m = make(seed=6)
    tokens = torch.randint(0, 17, (1, 20))
    base = m(tokens).logits
    for t in (0, 7, 19):
        changed = tokens.clone()
        changed[0, t] = (changed[0, t] + 1) % 17
        out = m(changed).logits
        torch.testing.assert_close(out[:, :, :t], base[:, :, :t], rtol=0, atol=1e-12)
        assert (out[:, :, t:] - base[:, :, t:]).abs().max() > 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_batch_equals_each_sample_alone(variant):
    m = make(seed=7, variant=variant)
    with torch.no_grad():  # the halt head starts at zero weights: make q_halt depend on the input
        m.block.halt.weight.normal_(0, 1.0)
    lengths = [13, 6, 9]
    seqs = [torch.randint(0, 17, (n,)) for n in lengths]
    T = max(lengths)
    right = torch.full((3, T), 10)
    mask = torch.zeros(3, T, dtype=torch.bool)
    left = torch.full((3, T), 10)
    lmask = torch.zeros(3, T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        right[i, :len(s)], mask[i, :len(s)] = s, True
        left[i, T - len(s):], lmask[i, T - len(s):] = s, True
    out_r = m(right, mask)
    out_l = m(left, lmask)
    for i, s in enumerate(seqs):
        alone = m(s[None])
        n = len(s)
        torch.testing.assert_close(out_r.logits[:, i, :n], alone.logits[:, 0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out_l.logits[:, i, T - n:], alone.logits[:, 0], rtol=1e-9, atol=1e-9)
        # the halt head reads the last real token by default, wherever the padding is
        torch.testing.assert_close(out_r.q_halt[:, i], alone.q_halt[:, 0])
        torch.testing.assert_close(out_l.q_halt[:, i], alone.q_halt[:, 0])
    assert out_r.q_halt[:, 0].std() > 0 and not torch.allclose(out_r.q_halt[:, 0], out_r.q_halt[:, 1])


def test_gradients_reach_the_first_step_from_the_last():
    m = make(seed=8, step_embedding=True, max_steps=4)
    out = m(torch.randint(0, 17, (2, 10)))
    out.logits[-1].logsumexp(-1).sum().backward()  # a loss on the last step's logits only
    g = m.step_embed.grad
    assert g[0].abs().sum() > 0  # full BPTT: step 0's input influences the last step's loss
    assert g[-1].abs().sum() > 0


def count_block_rows(m):
    rows = []
    m.block.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    return rows


@pytest.mark.parametrize("k", [1, 2, 3])
def test_forced_halt_runs_exactly_k_steps(k, monkeypatch):
    m = make(seed=9)
    rows = count_block_rows(m)
    monkeypatch.setattr(m, "should_halt", lambda qh, qc, s: torch.full_like(qh, s + 1 >= k, dtype=torch.bool))
    out = m(torch.randint(0, 17, (4, 9)), halt=True)
    assert rows == [4] * k and out.steps.tolist() == [k] * 4 and out.logits.shape[0] == k


def test_halting_rule_reads_the_halt_head():
    m = make(seed=10)
    rows = count_block_rows(m)
    with torch.no_grad():
        m.block.halt.bias.copy_(torch.tensor([5.0, -5.0]))  # sigmoid(10) > 0.5 at once
    out = m(torch.randint(0, 17, (3, 8)), halt=True)
    assert out.steps.tolist() == [1, 1, 1] and rows == [3]
    rows.clear()
    assert m(torch.randint(0, 17, (3, 8))).steps.tolist() == [3, 3, 3]  # training mode: always N


def test_samples_halting_at_different_steps_equal_each_alone():
    m = make(seed=11)
    rows = count_block_rows(m)
    tokens = torch.randint(0, 17, (3, 11))
    steps = torch.tensor([1, 3, 2])
    out = m(tokens, halt=True, steps=steps)
    assert rows == [3, 2, 1]  # halted samples leave the batch: they stop costing compute
    for i in range(3):
        alone = m(tokens[i:i + 1], halt=True, steps=steps[i:i + 1])
        torch.testing.assert_close(out.final_logits[i], alone.final_logits[0], rtol=1e-9, atol=1e-9)
        n = int(steps[i])
        torch.testing.assert_close(out.logits[n - 1, i], alone.logits[n - 1, 0], rtol=1e-9, atol=1e-9)


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", [*VARIANTS, "dyn+qk_norm", "dense+qk_norm"])
def test_kv_cache_decoding_equals_full_recompute(variant, device):
    """On the CPU in float64; on CUDA in float32, through its own kernels (SDPA, one composition chunk)."""
    dtype, rtol, atol = (torch.float64, 0.0, 1e-5) if device == "cpu" else (torch.float32, 1e-4, 1e-4)
    variant, _, norm = variant.partition("+")
    m = make(seed=12, dtype=dtype, variant=variant, qk_norm=bool(norm)).to(device)
    if norm:  # gains away from 1, so that a path that skipped them would differ
        with torch.no_grad():
            for p in m.block.attn.qk_norm.parameters():
                p.uniform_(0.5, 2.0)
    lengths = torch.tensor([9, 5, 7], device=device)
    T = int(lengths.max())
    prompts = torch.randint(0, 17, (3, T), device=device)
    steps = torch.tensor([3, 1, 2], device=device)
    logits, state = m.prefill(prompts, lengths, max_new=6, steps=steps)
    seqs = [prompts[i, :lengths[i]].tolist() for i in range(3)]
    for t in range(6):
        for i in range(3):
            full = m(torch.tensor([seqs[i]], device=device), halt=True, steps=steps[i:i + 1]).final_logits[0, -1]
            torch.testing.assert_close(logits[i], full, rtol=rtol, atol=atol)
        nxt = torch.randint(0, 17, (3,), device=device)  # any continuation: the cache must follow what is fed
        for i in range(3):
            seqs[i].append(int(nxt[i]))
        logits = m.decode(nxt, state)


@pytest.mark.parametrize("kw", [{}, {"attn_active": 2.0, "grid_coords": "origin"}])
def test_static_decoding_equals_decoding(kw):
    """decode(static=True), what a CUDA graph captures (whole-cache attention under the mask, experts computed
    densely), gives decode's logits and advances the same state."""
    from dyntrm.model.generate import decode

    m = make(seed=15, **kw)
    lengths = torch.tensor([9, 5, 7])
    prompts = torch.randint(0, 17, (3, 9))
    steps = torch.tensor([3, 1, 2])
    _, eager = m.prefill(prompts, lengths, max_new=5, steps=steps)
    _, static = m.prefill(prompts, lengths, max_new=5, steps=steps)
    for t in range(5):
        nxt = torch.randint(0, 17, (3,))
        torch.testing.assert_close(decode(m, nxt, static, static=True), decode(m, nxt, eager), rtol=1e-10,
                                   atol=1e-10)
        for a, b in zip(static.counters(), eager.counters()):
            assert torch.equal(a, b)


def test_kv_cache_with_act_decided_at_prefill():
    m = make(seed=13, dtype=torch.float32)
    with torch.no_grad():  # make the halt head depend on the input so samples stop at different steps
        m.block.halt.weight.normal_(0, 3.0)
    prompts = torch.randint(0, 17, (6, 10))
    lengths = torch.full((6,), 10)
    logits, state = m.prefill(prompts, lengths, max_new=3)
    ref = m(prompts, halt=True)
    assert state.steps.tolist() == ref.steps.tolist()
    torch.testing.assert_close(logits, ref.final_logits[:, -1], rtol=0, atol=1e-5)


@given(st.integers(1, 3), st.integers(2, 12), st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_output_shapes(batch, length, seed):
    torch.manual_seed(seed)
    m = ArcTransformer(model_cfg())
    out = m(torch.randint(0, 17, (batch, length)))
    S = m.cfg.max_steps
    assert out.logits.shape == (S, batch, length, m.cfg.vocab_size)
    assert out.q_halt.shape == out.q_continue.shape == (S, batch)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", ["debug", "tiny"])
@pytest.mark.parametrize("variant", [*VARIANTS, "dyn+qk_norm", "dynmoe+next", "dynmoe+shared", "dynmoe+nodihedral"])
def test_info_parameter_counts_match_the_model(name, variant):
    from dyntrm.model.info import model_info

    cfg = preset(name).model
    cfg.variant, _, extra = variant.partition("+")
    cfg.qk_norm = extra == "qk_norm"
    if extra == "next":
        cfg.size_header, cfg.grid_coords = True, "next"
    if extra == "shared":
        cfg.size_header, cfg.grid_coords, cfg.coord_tables = True, "borders", "shared"
    if extra == "nodihedral":
        cfg.dihedral_cells = False
    m = ArcTransformer(cfg)
    info = model_info(cfg)
    assert info["params_total"] == sum(p.numel() for p in m.parameters())
    if cfg.variant in ("dyn", "dynsiha"):
        assert info["params_attn_library"] == m.attn_expert_library.w1.numel() + m.attn_expert_library.w2.numel()
    else:
        assert m.attn_expert_library is None and "params_attn_library" not in info
    if cfg.variant in ("dyn", "dynmoe"):
        assert info["params_ffn_library"] == m.ffn_expert_library.w1.numel() + m.ffn_expert_library.w2.numel()
        assert info["params_active_per_token"] < info["params_total"]
    else:
        assert m.ffn_expert_library is None and info["params_active_per_token"] == info["params_total"]


@pytest.mark.parametrize("variant", ["dyn", "dense"])
def test_qk_norm_gives_unit_rms_queries_and_keys_times_their_gains(variant):
    """With model.qk_norm, every (token, head) query and key reaching RoPE has RMS 1 over its channels, times the
    learned gain; values are untouched."""
    import dyntrm.model.attention as A

    m = make(seed=3, variant=variant, qk_norm=True)
    with torch.no_grad():
        m.block.attn.qk_norm.q.weight.fill_(2.0)
    seen = []
    real = A.attend
    A.attend = lambda q, k, v, ctx: seen.append((q, k, v)) or real(q, k, v, ctx)
    try:
        m(torch.randint(0, 17, (2, 9)))
    finally:
        A.attend = real
    assert len(seen) == m.cfg.max_steps
    for q, k, v in seen:
        # up to the norm's epsilon (1e-6 beside a mean square of order 1)
        torch.testing.assert_close(q.square().mean(-1).sqrt(), torch.full(q.shape[:-1], 2.0, dtype=q.dtype),
                                   rtol=1e-5, atol=0)
        torch.testing.assert_close(k.square().mean(-1).sqrt(), torch.ones(k.shape[:-1], dtype=k.dtype),
                                   rtol=1e-5, atol=0)
        assert not torch.allclose(v.square().mean(-1).sqrt(), torch.ones(v.shape[:-1], dtype=v.dtype))


def test_attn_init_scale_scales_the_composed_qkv_only():
    """model.attn_init_scale multiplies the attention library's output weights at initialisation (so the composed
    Q, K, V, linear in them), and nothing else."""
    a, b = make(seed=4), make(seed=4, attn_init_scale=0.25)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    torch.testing.assert_close(pb["attn_expert_library.w2"], 0.25 * pa["attn_expert_library.w2"])
    assert all(torch.equal(pa[n], pb[n]) for n in pa if n != "attn_expert_library.w2")


def test_hybrid_variants_take_each_half_from_one_side():
    """dynsiha = DynSIHA+ attention with the dense FFN; dynmoe = dense attention with DynMoE: each half's
    parameters are exactly those of the variant it comes from (so the halves are the same modules)."""
    cfg = preset("debug").model
    built = {v: ArcTransformer(replace(cfg, variant=v)) for v in VARIANTS}

    def shapes(m, part):
        return [(n, p.shape) for n, p in m.named_parameters() if n.startswith(part)]

    for hybrid, attn_from, ffn_from in (("dynsiha", "dyn", "dense"), ("dynmoe", "dense", "dyn")):
        m = built[hybrid]
        assert shapes(m, "block.attn") == shapes(built[attn_from], "block.attn")
        assert shapes(m, "attn_expert_library") == shapes(built[attn_from], "attn_expert_library")
        assert shapes(m, "block.ffn") == shapes(built[ffn_from], "block.ffn")
        assert shapes(m, "ffn_expert_library") == shapes(built[ffn_from], "ffn_expert_library")


def test_dense_variant_has_the_same_active_ffn_width():
    """The dense baseline's FFN has the parameters (so the FLOPs) of DynMoE's experts at its target: ffn_active of
    the FFN library's experts, as built by the dyn variant."""
    cfg = preset("tiny").model
    dyn, dense = ArcTransformer(cfg), ArcTransformer(replace(cfg, variant="dense"))
    one_expert = dyn.ffn_expert_library.w1[0].numel() + dyn.ffn_expert_library.w2[0].numel()
    assert sum(p.numel() for p in dense.block.ffn.parameters()) == cfg.ffn_active * one_expert
    assert dense.attn_expert_library is None and dense.ffn_expert_library is None


@given(T=st.integers(1, 6), extra=st.integers(0, 3), causal=st.booleans(), masked=st.booleans(),
       seed=st.integers(0, 2 ** 16))
@settings(max_examples=25, deadline=None)
def test_math_attention_is_sdpa(T, extra, causal, masked, seed):
    """The matmul attention used under torch.func.vmap computes what SDPA does, with a causal mask (SDPA's: query i
    sees keys 0..i, also where there are more keys than queries), an explicit mask, or both, in float64."""
    from dyntrm.model.attention import math_attention

    g = torch.Generator().manual_seed(seed)
    S = T + extra
    q, k, v = (torch.randn(2, 3, n, 4, generator=g, dtype=torch.float64) for n in (T, S, S))
    mask = torch.rand(2, 1, T, S, generator=g) < 0.7 if masked else None
    if mask is not None:
        mask[..., 0] = True  # no empty row (SDPA and softmax would both give NaN there)
    attn = AttnMask(causal, mask)
    if causal and mask is not None:  # SDPA takes one or the other: the reference gets the conjunction
        ref_mask = mask & torch.ones(T, S, dtype=torch.bool).tril()
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=ref_mask)
    else:
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(math_attention(q, k, v, attn), want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("variant", ["dyn", "dynmoe"])
def test_vmapped_forward_over_stacked_copies_is_each_copys_forward(variant):
    """ArcTransformer.forward(vmapped=True) under torch.func.vmap over K different copies of the weights, each
    with its own right-padded batch, gives what each copy's plain forward gives on its batch."""
    from torch.func import functional_call, stack_module_state, vmap

    cfg = preset("debug").model
    copies = []
    for seed in range(3):
        torch.manual_seed(seed)
        copies.append(ArcTransformer(replace(cfg, variant=variant)).train())
    stacked, buffers = stack_module_state(copies)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 10, (3, 2, 24), generator=g)
    mask = torch.ones(3, 2, 24, dtype=torch.bool)
    mask[0, 1, 17:] = mask[2, 0, 9:] = False  # right padding, a different amount per copy
    end = torch.tensor([[23, 16], [23, 23], [8, 23]])
    fields = ("logits", "q_halt", "q_continue", "moe_l1", "moe_active")

    def run(p, b, t, m, e):
        out = functional_call(copies[0], {**p, **b}, (t, m, e), {"vmapped": True})
        return tuple(getattr(out, f) for f in fields)

    got = vmap(run)(stacked, buffers, tokens, mask, end)
    for c, model in enumerate(copies):
        want = model(tokens[c], mask[c], end[c])
        real = mask[c]
        for f, x in zip(fields, got):
            w, x = getattr(want, f), x[c]
            if f == "logits":  # padding positions' outputs are unused and may differ
                w, x = w[:, real], x[:, real]
            torch.testing.assert_close(x, w, atol=1e-5, rtol=1e-4, msg=f"copy {c}, {f}")
