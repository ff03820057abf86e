"""Serialisation: a hand-worked golden sequence, round trips, masks, and decoding that refuses to guess."""

import numpy as np
import pytest
from hypothesis import given

from conftest import grids
from dyntrm.data.arc import Pair
from dyntrm.data.tokens import (BOS, END, EOS, IN, OUT, ROW, GridDecodeError, decode_answer, encode,
                                encode_prompt, grid_tokens, render, sequence_length, tokens_to_grid)


def test_golden_tiny_task():
    # One demonstration (1x2 -> 2x1) and a query (1x1 -> 1x1), worked out by hand:
    demo = Pair(np.array([[1, 2]]), np.array([[3], [4]]))
    query = Pair(np.array([[5]]), np.array([[6]]))
    enc = encode([demo, query])
    expected = [BOS, IN, 1, 2, OUT, 3, ROW, 4, END, IN, 5, OUT, 6, END, EOS]
    assert enc.tokens.tolist() == expected
    assert render(enc.tokens) == "<bos> <in> 1 2 <out> 3 <row> 4 <end> <in> 5 <out> 6 <end> <eos>"
    # loss on output grids, their separators and closing <end>; nothing else
    assert enc.target.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0]
    # the ACT target: the query's answer only
    assert enc.answer.tolist() == [0] * 12 + [1, 1, 0]
    assert enc.prompt_end == 11 and enc.tokens[enc.prompt_end] == OUT
    prompt = encode_prompt([demo], query.input)
    assert prompt.tokens.tolist() == expected[:12] and prompt.prompt_end == 11
    assert not prompt.target[-1] and len(prompt) == sequence_length([demo, query], with_answer=False)


def test_grid_tokens_by_hand():
    assert grid_tokens(np.array([[7, 8, 9], [0, 1, 2]])).tolist() == [7, 8, 9, ROW, 0, 1, 2]
    assert grid_tokens(np.array([[3]])).tolist() == [3]


@given(grids())
def test_tokens_grid_tokens_round_trip(g):
    toks = grid_tokens(g)
    assert len(toks) == g.shape[0] * g.shape[1] + g.shape[0] - 1
    back = tokens_to_grid(toks)
    np.testing.assert_array_equal(back, g)
    assert grid_tokens(back).tolist() == toks.tolist()


@given(grids(max_side=8), grids(max_side=8), grids(max_side=8))
def test_sequence_length_matches_encode(a, b, c):
    pairs = [Pair(a, b), Pair(c, a)]
    assert len(encode(pairs)) == sequence_length(pairs)
    assert encode(pairs).prompt_end == len(encode_prompt(pairs[:1], c)) - 1


@pytest.mark.parametrize("tokens,msg", [
    ([1, 2, ROW, 3], "ragged grid: row 1 has 1 cells, row 0 has 2"),
    ([], "empty grid"),
    ([1, ROW, ROW, 2], "empty row 1"),
    ([ROW, 1], "empty row 0"),
    ([1, OUT, 2], "token <out> inside a grid"),
    ([1] * 31, "exceeds 30x30"),
])
def test_decode_refuses_malformed(tokens, msg):
    with pytest.raises(GridDecodeError, match=msg):
        tokens_to_grid(tokens)


def test_decode_answer_stops_at_end():
    np.testing.assert_array_equal(decode_answer([1, 2, ROW, 3, 4, END, 9, 9]), [[1, 2], [3, 4]])
    with pytest.raises(GridDecodeError, match="no closing"):
        decode_answer([1, 2])


def test_changed_cells_by_hand():
    """encode marks the output cells unlike the input's cell at the same place, in same-shape pairs only; never a
    header, ROW, END or input token."""
    from dyntrm.data.tokens import changed_cells

    a, b = np.array([[1, 2], [3, 4]]), np.array([[1, 5], [3, 0]])
    assert changed_cells(a, b).tolist() == [False, True, False, False, True]  # 1 5 | 3 0
    assert changed_cells(a, b, header=True).tolist() == [False, False, False, True, False, False, True]
    assert not changed_cells(a, np.array([[1, 2, 3]])).any()  # another shape: nothing is "changed"
    enc = encode([Pair(a, b), Pair(a, np.array([[9]]))], header=True)
    where = np.flatnonzero(enc.changed).tolist()
    assert [int(enc.tokens[i]) for i in where] == [5, 0] and enc.target[where].all()
