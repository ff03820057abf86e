"""The size header and grid coordinates (issue 11): serialisation by hand, round trips, decoding that can only
write the shape it chose, coordinates against a naive loop, and the KV cache with coordinates."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import grids
from dyntrm.config import preset
from dyntrm.data.arc import Pair
from dyntrm.data.tokens import (BOS, END, EOS, IN, N_COLOURS, OUT, PAD, ROW, SIZE0, GridDecodeError, decode_answer,
                                encode, encode_prompt, grid_tokens, render, sequence_length, size_token,
                                tokens_to_grid)
from dyntrm.model.generate import GridConstraint, generate
from dyntrm.model import ArcTransformer
from dyntrm.model.layers import MAX_PAIR, PAIR_ANSWER, GridCursor, grid_coords, pair_ids


def test_header_sequence_by_hand():
    demo = Pair(np.array([[1, 2]]), np.array([[3], [4]]))
    query = Pair(np.array([[5]]), np.array([[6]]))
    enc = encode([demo, query], header=True)
    n = size_token
    expected = [BOS, IN, n(1), n(2), 1, 2, OUT, n(2), n(1), 3, ROW, 4, END, IN, n(1), n(1), 5, OUT, n(1), n(1), 6,
                END, EOS]
    assert enc.tokens.tolist() == expected
    assert render(enc.tokens[:7]) == "<bos> <in> #1 #2 1 2 <out>"
    # the output's size tokens are trained (the shape decision) and part of the ACT answer
    assert enc.target.tolist() == [0] * 7 + [1] * 6 + [0] * 5 + [1] * 4 + [0]
    assert enc.answer.tolist() == [0] * 18 + [1] * 4 + [0]
    assert enc.prompt_end == 17 and enc.tokens[17] == OUT
    prompt = encode_prompt([demo], query.input, header=True)
    assert prompt.tokens.tolist() == expected[:18]
    assert len(enc) == sequence_length([demo, query], header=True)


@given(grids())
def test_header_round_trip(g):
    toks = grid_tokens(g, header=True)
    assert toks[:2].tolist() == [SIZE0 + g.shape[0] - 1, SIZE0 + g.shape[1] - 1]
    np.testing.assert_array_equal(decode_answer([*toks, END, 3], header=True), g)
    np.testing.assert_array_equal(tokens_to_grid(toks[2:]), g)


@pytest.mark.parametrize("tokens,msg", [
    ([1, 2, END], "does not start with its size"),
    ([size_token(2), size_token(1), 1, 2, END], "header says 2x1, grid is 1x2"),
])
def test_header_decode_refuses_disagreement(tokens, msg):
    with pytest.raises(GridDecodeError, match=msg):
        decode_answer(tokens, header=True)


def _naive_coords(tokens):
    """(row, col, row_up, col_left) per token by a plain left-to-right scan that remembers the grid's header."""
    out = []
    r = c = h = w = 0
    since = 2  # no grid has started: no size header can follow
    for t in tokens:
        if t in (IN, OUT):
            r = c = since = h = w = 0
            out.append((0, 0, 0, 0))
            continue
        if since == 0 and SIZE0 <= t < SIZE0 + 30:
            h = t - SIZE0 + 1
        if since == 1 and SIZE0 <= t < SIZE0 + 30:
            w = t - SIZE0 + 1
        since = min(since + 1, 2)
        if t < N_COLOURS or t == ROW:
            out.append((r + 1, c + 1, h - r if h else 0, w - c if (w and t != ROW) else 0))
            if t == ROW:
                r, c = r + 1, 0
            else:
                c += 1
        else:  # size tokens, END, EOS, padding
            out.append((0, 0, 0, 0))
            c = 0
    return out


@given(grids(max_side=5), grids(max_side=5), grids(max_side=5), st.booleans())
@settings(max_examples=40)
def test_grid_coords_match_a_naive_scan(a, b, c, header):
    toks = encode([Pair(a, b), Pair(c, a)], header=header).tokens
    got = grid_coords(torch.from_numpy(toks)[None])[0]
    assert [tuple(x) for x in got.tolist()] == _naive_coords(toks.tolist())
    # by hand: the first input grid's cells, row by row, from every border
    h, w = a.shape
    first = got[toks.tolist().index(IN) + 1:][: (3 if header else 1) and 10_000]
    cells = [tuple(x) for x, t in zip(first.tolist(), toks[toks.tolist().index(IN) + 1:]) if t < N_COLOURS][:h * w]
    assert cells == [(r + 1, k + 1, (h - r) if header else 0, (w - k) if header else 0)
                     for r in range(h) for k in range(w)]


@given(st.lists(st.integers(0, 46), min_size=2, max_size=40), st.data(), st.booleans())
@settings(max_examples=80)
def test_cursor_follows_grid_coords_one_token_at_a_time(tokens, data, with_next):
    toks = torch.tensor(tokens)[None]
    want = grid_coords(toks, with_next=with_next)[0]
    # random streams too (causal, no look-ahead); the next-token columns extend the four, never change them
    assert [tuple(x[:4]) for x in want.tolist()] == _naive_coords(tokens)
    cut = data.draw(st.integers(1, len(tokens) - 1))
    assert torch.equal(grid_coords(toks[:, :cut], with_next=with_next)[0], want[:cut])  # a prefix: the same
    cur = GridCursor(toks[:, :cut], torch.tensor([cut]), with_next=with_next)
    for t in range(cut, len(tokens)):
        assert cur.step(toks[:, t])[0].tolist() == want[t].tolist()


@given(grids(max_side=5), grids(max_side=5), grids(max_side=5))
@settings(max_examples=40)
def test_next_coords_name_the_token_that_follows(a, b, c):
    """In a well-formed stream with headers, what a token is told about the next one is that token's own place:
    the first cell after the width, the separator after a row's last cell, the next row after a separator, and
    nothing (0) after a grid's last cell or outside grids."""
    toks = torch.from_numpy(encode([Pair(a, b), Pair(c, a)], header=True).tokens)
    got = grid_coords(toks, with_next=True)
    torch.testing.assert_close(got[:-1, 4:], got[1:, :4], rtol=0, atol=0)
    assert got[-1, 4:].tolist() == [0, 0, 0, 0]
    # by hand: the input grid's width token points at its first cell, its last cell at nothing
    w_at = toks.tolist().index(IN) + 2
    h, w = a.shape
    assert got[w_at, 4:].tolist() == [1, 1, h, w]
    assert got[w_at + h * (w + 1) - 1, 4:].tolist() == [0, 0, 0, 0]  # the last cell: OUT follows


def test_next_coords_by_hand_and_without_a_header():
    n = size_token
    toks = torch.tensor([IN, n(2), n(2), 1, 2, ROW, 3, 4, OUT, 5, ROW, 6, END])  # the output grid has no header
    got = grid_coords(toks, with_next=True)[:, 4:].tolist()
    assert got[:9] == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 2, 2], [1, 2, 2, 1], [1, 3, 2, 0], [2, 1, 1, 2],
                       [2, 2, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert got[9:] == [[0, 0, 0, 0]] * 4  # no header, no size: what follows is not fixed


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = preset("debug").model
    for k, v in kw.items():
        setattr(cfg, k, v)
    return ArcTransformer(cfg).eval()


@pytest.mark.parametrize("coords,tables", [("borders", "separate"), ("next", "separate"), ("borders", "shared")])
def test_kv_cache_with_grid_coords_equals_recompute(coords, tables):
    m = _model(3, grid_coords=coords, size_header=True, coord_tables=tables).double()
    prompts = [encode_prompt([Pair(np.array([[1, 2], [3, 4]]), np.array([[5]]))], np.array([[6, 7]]),
                             header=True).tokens, np.array([BOS, IN, size_token(1), size_token(1), 2, OUT])]
    steps = torch.tensor([3, 2])
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.full((2, int(lengths.max())), PAD)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.from_numpy(p)
    logits, state = m.prefill(tokens, lengths, max_new=6, steps=steps)
    seqs = [list(p) for p in prompts]
    feed = [[size_token(2), size_token(1), 3, ROW, 4, END], [size_token(1), size_token(1), 9, END, IN, 1]]
    for t in range(6):
        for i in range(2):
            full = m(torch.tensor([seqs[i]]), halt=True, steps=steps[i:i + 1]).final_logits[0, -1]
            torch.testing.assert_close(logits[i], full, rtol=0, atol=1e-9)
        nxt = torch.tensor([feed[0][t], feed[1][t]])
        for i in range(2):
            seqs[i].append(int(nxt[i]))
        logits = m.decode(nxt, state)


def _naive_pairs(tokens):
    """pair_ids by hand: count the IN tokens of the whole stream, then walk it remembering the last marker."""
    total, seen, side, out = tokens.count(IN), 0, 0, []
    for t in tokens:
        if t == IN:
            seen, side = seen + 1, 0
        elif t == OUT:
            side = 1
        out.append(0 if seen == 0 else 1 + 2 * min(total - seen, MAX_PAIR) + side)
    return out


def test_pair_ids_by_hand():
    demo, query = Pair(np.array([[1, 2]]), np.array([[3]])), Pair(np.array([[5]]), np.array([[6]]))
    toks = encode([demo, query], header=False).tokens.tolist()
    # BOS | IN 1 2 OUT 3 END (1 pair back: input 3, output 4) | IN 5 OUT 6 END EOS (the query: input 1, output 2)
    assert pair_ids(torch.tensor(toks)).tolist() == [0, 3, 3, 3, 4, 4, 4, 1, 1, 2, 2, 2, 2]
    assert PAIR_ANSWER == 2


@given(st.lists(st.integers(0, 46), min_size=1, max_size=60))
@settings(max_examples=80)
def test_pair_ids_match_a_naive_scan(tokens):
    assert pair_ids(torch.tensor(tokens)[None])[0].tolist() == _naive_pairs(tokens)


def test_kv_cache_with_pair_embed_equals_recompute():
    """Decoding gives every written token the query's output side: the full forward over the same tokens agrees."""
    m = _model(4, grid_coords="borders", size_header=True, pair_embed=True).double()
    demos = [Pair(np.array([[1, 2], [3, 4]]), np.array([[5]])), Pair(np.array([[2]]), np.array([[7, 7]]))]
    prompt = encode_prompt(demos, np.array([[6, 7]]), header=True).tokens
    tokens = torch.from_numpy(prompt)[None]
    steps = torch.tensor([3])
    logits, state = m.prefill(tokens, torch.tensor([len(prompt)]), max_new=5, steps=steps)
    seq = list(prompt)
    for t in [size_token(2), size_token(1), 3, ROW, 4]:
        full = m(torch.tensor([seq]), halt=True, steps=steps).final_logits[0, -1]
        torch.testing.assert_close(logits[0], full, rtol=0, atol=1e-9)
        seq.append(t)
        logits = m.decode(torch.tensor([t]), state)


@pytest.mark.parametrize("kind", ["borders", "next"])
def test_grid_coords_change_the_model_only_where_switched_on(kind):
    toks = torch.from_numpy(encode([Pair(np.array([[1, 2]]), np.array([[2, 1]]))], header=True).tokens)[None]
    plain, coords = _model(5, size_header=True, grid_coords="off"), _model(5, size_header=True, grid_coords=kind)
    assert len(coords.coord_embed) == {"borders": 4, "next": 8}[kind]
    coords.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        a, b = plain(toks).final_logits, coords(toks).final_logits
        for table in coords.coord_embed:
            table.weight.zero_()
        c = coords(toks).final_logits
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, c)


def test_shared_coord_tables_by_hand():
    """model.coord_tables=shared: a token's coordinate embedding is Σ_k table[coord_k] @ maps[k] (by hand, on a
    2x3 grid's cells), index k has one embedding whatever the coordinate, up to that coordinate's map; the maps start
    orthogonal. (KV-cached decoding under it: test_kv_cache_with_grid_coords_equals_recompute.)"""
    m = _model(5, size_header=True, grid_coords="borders", coord_tables="shared").double()
    assert len(m.coord_embed) == 0 and m.coord_embed_maps.shape == (4, m.cfg.d_model, m.cfg.d_model)
    eye = torch.eye(m.cfg.d_model, dtype=m.coord_embed_maps.dtype)
    for M in m.coord_embed_maps:
        torch.testing.assert_close(M.T @ M, eye, rtol=0, atol=1e-6)  # orthogonal in float32, then cast
    toks = torch.from_numpy(encode([Pair(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[0]]))], header=True).tokens)[None]
    got = m.embed_tokens(toks) - m.embed(toks)
    table, maps = m.coord_embed_shared.weight, m.coord_embed_maps
    cells = [i for i, t in enumerate(toks[0].tolist()) if t < 10][:6]  # the input grid's cells, row by row
    for j, i in enumerate(cells):
        r, c = divmod(j, 3)
        coords = (r + 1, c + 1, 2 - r, 3 - c)  # from the top and left, from the bottom and right, 1-based
        want = sum(table[v] @ maps[k] for k, v in enumerate(coords))
        torch.testing.assert_close(got[0, i], want, rtol=0, atol=1e-9)


def test_header_state_machine_by_hand():
    c = GridConstraint(1, 48, torch.device("cpu"), max_side=torch.tensor([4]), header=True)
    a = c.allowed()[0]
    assert a[SIZE0:SIZE0 + 4].all() and not a[SIZE0 + 4:].any() and not a[:N_COLOURS].any() and not a[END]
    for t in (size_token(2), size_token(3)):
        c.update(torch.tensor([t]))
    for t in (1, 2, 3):  # row 0: three cells, then only the separator
        assert c.allowed()[0, :N_COLOURS].all() and not c.allowed()[0, END]
        c.update(torch.tensor([t]))
    a = c.allowed()[0]
    assert a.nonzero().flatten().tolist() == [ROW]
    for t in (ROW, 4, 5, 6):
        c.update(torch.tensor([t]))
    assert c.allowed()[0].nonzero().flatten().tolist() == [END]  # two rows of three: the grid must close


def _biased(seed, bias_token):
    m = _model(seed, size_header=True)
    with torch.no_grad():
        m.lm_head.weight.normal_(0, 3.0)
        if bias_token is not None:  # push hard toward one token to stress the constraint
            m.lm_head.weight[bias_token] += 50 * m.norm.weight.sign()
    return m


@given(st.integers(0, 10_000), st.sampled_from([None, ROW, END, OUT, PAD, 3, size_token(30), size_token(1)]),
       st.integers(1, 30))
@settings(max_examples=12, deadline=None)
def test_decoding_under_the_header_writes_exactly_the_chosen_shape(seed, bias, cap):
    m = _biased(seed, bias)
    n = size_token
    prompts = [np.array([BOS, IN, n(1), n(2), 1, 2, OUT]), np.array([BOS, IN, n(2), n(1), 5, ROW, 6, OUT])]
    for g in generate(m, prompts, max_sides=[cap, cap]):
        h, w = g.tokens[0] - SIZE0 + 1, g.tokens[1] - SIZE0 + 1
        assert 1 <= h <= cap and 1 <= w <= cap
        assert g.grid is not None and g.grid.shape == (h, w) and g.tokens[-1] == END
        assert len(g.tokens) == 2 + h * w + h - 1 + 1


@given(st.integers(0, 10_000), st.sampled_from([None, ROW, END, size_token(30), size_token(1)]),
       st.tuples(st.integers(0, 30), st.integers(0, 30)), st.tuples(st.integers(1, 30), st.integers(1, 30)))
@settings(max_examples=12, deadline=None)
def test_fixed_sizes_write_that_header_and_nothing_else_changes(seed, bias, hw, other):
    """``sizes``: the header is the one given (0: the model's own choice, as when decoding without sizes), the
    answer a well-formed grid of that shape; a sample's fixed size does not touch its neighbour's decoding."""
    m = _biased(seed, bias)
    n = size_token
    prompts = [np.array([BOS, IN, n(1), n(2), 1, 2, OUT]), np.array([BOS, IN, n(2), n(1), 5, ROW, 6, OUT])]
    free = generate(m, prompts)
    fixed = generate(m, prompts, sizes=[hw, other], max_sides=[30, 1])  # a fixed side goes past max_side
    for g, f, (h, w) in zip(free, fixed, [hw, other]):
        own = (g.tokens[0] - SIZE0 + 1, g.tokens[1] - SIZE0 + 1)
        if h in (0, own[0]) and w in (0, own[1]):  # nothing pinned away from the model's own choice: its own answer
            assert f.tokens == g.tokens
        h = h or own[0]  # the height comes first: free, it is the model's own
        w = w or f.tokens[1] - SIZE0 + 1  # free after a pinned height: the model's choice given that height
        assert f.tokens[:2] == [n(h), n(w)] and f.grid is not None and f.grid.shape == (h, w)


def test_side_of_inverts_size_token_and_names_nothing_else():
    from dyntrm.data.tokens import N_TOKENS, side_of

    assert [side_of(size_token(n)) for n in range(1, 31)] == list(range(1, 31))
    assert {side_of(t) for t in range(N_TOKENS + 8) if not SIZE0 <= t < SIZE0 + 30} == {0}


def test_fixed_sizes_need_the_header():
    with pytest.raises(ValueError, match="size_header"):
        GridConstraint(1, 32, torch.device("cpu"), header=False, sizes=torch.tensor([[2, 2]]))
