"""model.dihedral_cells (issue 11): what every output cell is told about its pair's input under the 8 symmetries of
the square, against numpy's own flips and rotations, one token at a time while decoding, and in the model."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import grids
from dyntrm.config import ConfigError, from_dict, preset, to_dict, validate
from dyntrm.data.arc import Pair
from dyntrm.data.tokens import END, IN, OUT, ROW, encode, encode_prompt, size_token
from dyntrm.model import ArcTransformer
from dyntrm.model.dyntrm import dihedral_rows
from dyntrm.model.layers import DIHEDRAL, DIHEDRAL_ROWS, GridCursor, dihedral_sources

# numpy's version of each symmetry, in DIHEDRAL's order: output = MAPS[g](input)
MAPS = {"identity": lambda g: g, "flip_lr": np.fliplr, "flip_ud": np.flipud, "rot180": lambda g: np.rot90(g, 2),
        "transpose": lambda g: g.T, "rot90cw": lambda g: np.rot90(g, -1), "rot90ccw": lambda g: np.rot90(g, 1),
        "antitranspose": lambda g: np.rot90(g, 2).T}


def _reference(pairs):
    """dihedral_sources by hand: walk the serialised pairs; for each output cell and each symmetry whose image of
    the input has the output's shape, the image's colour there (+ 1) at the cell, and at the token before it."""
    length = len(encode(pairs, header=True))
    ref = np.zeros((length, 16), np.int64)
    i = 1  # after BOS
    for p in pairs:
        (hi, wi), (ho, wo) = p.input.shape, p.output.shape
        i += 1 + 2 + hi * wi + hi - 1 + 1  # IN, header, cells and separators, OUT
        for g, name in enumerate(DIHEDRAL):
            image = MAPS[name](p.input)
            if image.shape != (ho, wo):
                continue
            for r in range(ho):
                for c in range(wo):
                    at = i + 2 + r * (wo + 1) + c
                    ref[at, g] = ref[at - 1, 8 + g] = image[r, c] + 1
        i += 2 + ho * wo + ho - 1 + 1  # header, cells and separators, END
    return ref


def test_maps_are_the_symmetries_in_order():
    assert tuple(MAPS) == DIHEDRAL
    a = np.arange(6).reshape(2, 3)
    images = {MAPS[n](a).tobytes() + bytes(MAPS[n](a).shape) for n in DIHEDRAL}
    assert len(images) == 8  # eight different maps


def test_sources_by_hand():
    """A 1x2 input flipped: the output's cells read 2, 1 from the identity and 1, 2 from the left-right flip (the
    other symmetries that keep a 1x2 shape: the up-down flip = identity, rot180 = flip); no transposed source for a
    1x2 output; the width token already knows its next cell's sources; nothing outside the output."""
    toks = torch.from_numpy(encode([Pair(np.array([[1, 2]]), np.array([[2, 1]]))], header=True).tokens)
    # BOS IN #1 #2 1 2 OUT #1 #2 2 1 END EOS
    got = dihedral_sources(toks)
    assert got[:8].eq(0).all() and got[11:].eq(0).all()
    own = got[9:11, :8].tolist()  # cells 2, 1
    assert own == [[2, 3, 2, 3, 0, 0, 0, 0], [3, 2, 3, 2, 0, 0, 0, 0]]
    assert got[8:10, 8:].tolist() == own  # the width token and the first cell: their next cell's
    assert got[10, 8:].eq(0).all()  # the last cell predicts END


@st.composite
def _pairs(draw):
    pairs = []
    for _ in range(draw(st.integers(1, 3))):
        a = draw(grids(max_side=5))
        kind = draw(st.sampled_from([*DIHEDRAL, "other"]))
        b = draw(grids(max_side=5)) if kind == "other" else np.ascontiguousarray(MAPS[kind](a))
        pairs.append(Pair(a, b))
    return pairs


@given(_pairs())
@settings(max_examples=60, deadline=None)
def test_sources_match_numpy(pairs):
    toks = torch.from_numpy(encode(pairs, header=True).tokens)
    np.testing.assert_array_equal(dihedral_sources(toks).numpy(), _reference(pairs))
    # causal: a prefix of the stream gives the same sources for its tokens
    cut = len(toks) // 2
    torch.testing.assert_close(dihedral_sources(toks[:cut]), dihedral_sources(toks)[:cut], rtol=0, atol=0)


@given(_pairs(), st.data())
@settings(max_examples=40, deadline=None)
def test_cursor_follows_the_stream_through_the_answer(pairs, data):
    toks = torch.from_numpy(encode(pairs, header=True).tokens)[None]
    want = dihedral_sources(toks)[0]
    last_out = max(j for j, t in enumerate(toks[0].tolist()) if t == OUT)
    cut = data.draw(st.integers(last_out + 1, toks.shape[1] - 1))
    cur = GridCursor(toks[:, :cut], torch.tensor([cut]), sources=True)
    for t in range(cut, toks.shape[1]):
        coords, got = cur.step_sources(toks[:, t])
        assert got[0].tolist() == want[t].tolist()
    # a grid that generation never writes (a new input, then its output) is not read against the stored one, where
    # the stream reads the new pair
    tail = [IN, size_token(1), size_token(1), 5, OUT, size_token(1), size_token(1), 5]
    stream = dihedral_sources(torch.cat([toks, torch.tensor([tail])], 1))[0, -1]
    assert stream[0] == 6  # the new pair's identity source: colour 5
    for t in tail:
        _, after = cur.step_sources(torch.tensor([t]))
        assert after.eq(0).all()


def test_cursor_batched_prompts_of_different_lengths_and_odd_ends():
    """Right-padded prompts of different lengths, one ending right after IN (no input grid yet: no sources, no
    crash): each row follows its own stream."""
    a, b = np.array([[1, 2, 3]]), np.array([[4], [5]])
    prompts = [encode_prompt([Pair(a, np.fliplr(a))], b, header=True).tokens,
               encode_prompt([Pair(b, b.T)], a, header=True).tokens, np.array([0, IN])]
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.full((3, int(lengths.max())), 0)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.from_numpy(p)
    cur = GridCursor(tokens, lengths, sources=True)
    answers = [[size_token(2), size_token(1), 5, ROW, 4, END], [size_token(1), size_token(3), 1, 2, 3, END],
               [size_token(1), size_token(2), 7, 7, END, END]]  # the third writes an input grid: no sources
    seqs, seen = [list(p) for p in prompts], torch.zeros(3, dtype=torch.long)
    for t in range(6):
        _, got = cur.step_sources(torch.tensor([ans[t] for ans in answers]))
        for i in range(3):
            seqs[i].append(answers[i][t])
            assert got[i].tolist() == dihedral_sources(torch.tensor(seqs[i]))[-1].tolist(), (i, t)
        seen += got.ne(0).sum(1)
    assert seen[0] > 0 and seen[1] > 0 and seen[2] == 0
    # the longest prompt ending right after IN (its header would lie past the stream)
    _, got = GridCursor(torch.tensor([[0, IN]]), torch.tensor([2]), sources=True).step_sources(torch.tensor([3]))
    assert got.eq(0).all()


def test_kv_cache_with_dihedral_cells_equals_recompute():
    """Decoding reads each written cell's sources off the prompt's last input: the full forward agrees, at every
    token of a flipped answer."""
    torch.manual_seed(0)
    cfg = preset("debug").model
    cfg.size_header, cfg.dihedral_cells, cfg.grid_coords = True, True, "off"
    m = ArcTransformer(cfg).eval().double()
    demos = [Pair(np.array([[1, 2], [3, 4]]), np.array([[2, 1], [4, 3]]))]
    prompt = encode_prompt(demos, np.array([[6, 7], [8, 9]]), header=True).tokens
    steps = torch.tensor([3])
    logits, state = m.prefill(torch.from_numpy(prompt)[None], torch.tensor([len(prompt)]), max_new=8, steps=steps)
    seq = list(prompt)
    for t in [size_token(2), size_token(2), 7, 6, ROW, 9, 8, END]:
        full = m(torch.tensor([seq]), halt=True, steps=steps).final_logits[0, -1]
        torch.testing.assert_close(logits[0], full, rtol=0, atol=1e-9)
        seq.append(t)
        logits = m.decode(torch.tensor([t]), state)


def test_rows_by_hand():
    """Per symmetry: own source in table g, next source in table 8 + g (11 rows each), then agreement (3 rows)."""
    tokens = torch.tensor([[5]])
    sources = torch.zeros(1, 1, 16, dtype=torch.long)
    sources[0, 0, 0], sources[0, 0, 1], sources[0, 0, 9] = 6, 3, 10  # identity reads 5 (agrees), flip reads 2
    rows = dihedral_rows(tokens, sources)[0, 0].tolist()
    assert rows[:2] == [6, 11 + 3] and rows[2:8] == [11 * g for g in range(2, 8)]
    assert rows[9] == 11 * 9 + 10
    agree = rows[16:]
    assert agree[0] == 176 + 2 and agree[1] == 176 + 3 + 1 and agree[2] == 176 + 6  # yes, no, none
    assert max(rows) < DIHEDRAL_ROWS == 200


def test_dihedral_cells_change_only_output_cells_at_first():
    """The "none" rows start at zero: inputs and everything outside an output grid embed as without the switch;
    the output's cells do not."""
    cfg = preset("debug").model
    cfg.size_header, cfg.dihedral_cells = True, False
    torch.manual_seed(1)
    plain = ArcTransformer(cfg)
    cfg.dihedral_cells = True
    torch.manual_seed(1)
    dih = ArcTransformer(cfg)
    dih.load_state_dict(plain.state_dict(), strict=False)
    toks = torch.from_numpy(encode([Pair(np.array([[1, 2]]), np.array([[2, 1]]))], header=True).tokens)[None]
    diff = (dih.embed_tokens(toks) - plain.embed_tokens(toks)).abs().sum(-1)[0]
    assert diff[:8].eq(0).all() and diff[11:].eq(0).all()
    assert (diff[8:11] > 0).all()  # the width token (its next cell), both cells


def test_configs_written_before_the_switch_read_as_without_it():
    """A run's config or a checkpoint from before model.dihedral_cells existed keeps the model it trained; a new
    config (and every preset) has it on."""
    old = to_dict(preset("tiny"))
    del old["model"]["dihedral_cells"]
    assert from_dict(old).model.dihedral_cells is False
    assert from_dict(to_dict(preset("tiny"))).model.dihedral_cells is True
    assert all(preset(name).model.dihedral_cells for name in ("debug", "tiny", "base"))


def test_dihedral_cells_need_the_size_header():
    cfg = preset("debug")
    cfg.model.size_header, cfg.model.grid_coords, cfg.model.dihedral_cells = False, "off", True
    with pytest.raises(ConfigError, match="dihedral_cells.*size_header"):
        validate(cfg)
