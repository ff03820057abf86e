"""The sanity ladder's families against hand-made examples, and the generator's guarantees."""

import json

import numpy as np
import pytest

from dyntrm.cli import main
from dyntrm.data.arc import load_source
from dyntrm.data.synth import FAMILIES, family_of, gravity, ladder, make_task, parse_sides

G = np.array([[1, 0, 2],
              [0, 3, 0]], np.uint8)

# Each rule on a hand-made grid, written out by hand.
HAND = {
    "identity": [[1, 0, 2], [0, 3, 0]],
    "mirror": [[2, 0, 1], [0, 3, 0]],
    "rotate": [[0, 1], [3, 0], [0, 2]],
    "transpose": [[1, 0], [0, 3], [2, 0]],
    "scale2": [[1, 1, 0, 0, 2, 2], [1, 1, 0, 0, 2, 2], [0, 0, 3, 3, 0, 0], [0, 0, 3, 3, 0, 0]],
    "tile": [[1, 0, 2, 1, 0, 2], [0, 3, 0, 0, 3, 0]],
}


@pytest.mark.parametrize("family", list(HAND))
def test_plain_rules_match_hand_made_examples(family, monkeypatch):
    import dyntrm.data.synth as synth

    monkeypatch.setattr(synth, "_noise", lambda rng, h, w, colours=None: G.copy())
    inp, out = FAMILIES[family].pair(np.random.default_rng(0), (2, 3), {})
    np.testing.assert_array_equal(inp, G)
    np.testing.assert_array_equal(out, HAND[family])


def test_gravity_by_hand():
    g = np.array([[1, 0, 2], [0, 0, 0], [3, 0, 0]])
    np.testing.assert_array_equal(gravity(g), [[0, 0, 0], [1, 0, 0], [3, 0, 2]])


def _tasks(family, n=15, sides=(3, 6)):
    rng = np.random.default_rng(7)
    return [make_task(family, i, rng, sides) for i in range(n)]


def test_recolour_is_one_map_per_task_shown_by_the_demonstrations():
    for t in _tasks("recolour"):
        mapping = {}
        for p in t.train + t.test:
            for a, b in zip(p.input.ravel(), p.output.ravel()):
                assert mapping.setdefault(int(a), int(b)) == b  # one consistent map over every pair
        shown = set(np.concatenate([p.input.ravel() for p in t.train]).tolist())
        assert set(t.test[0].input.ravel().tolist()) <= shown  # every test colour's image can be inferred
        assert any(a != b for a, b in mapping.items())  # not the identity


def test_crop_output_is_the_object_bounding_box():
    for t in _tasks("crop"):
        for p in t.train + t.test:
            rows, cols = np.nonzero(p.input)
            box = p.input[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            np.testing.assert_array_equal(p.output, box)
            assert p.output.size < p.input.size


def test_fill_fills_exactly_the_insides_of_the_rectangles():
    for t in _tasks("fill"):
        edge = inside = None
        for p in t.train + t.test:
            changed = p.output != p.input
            assert (p.input[changed] == 0).all()  # only blank cells change ...
            colours = set(p.output[changed].tolist())
            assert len(colours) <= 1
            inside = colours.pop() if colours else inside
            # ... and the nearest coloured cell left, right, above and below each changed cell is the edge colour
            nearest = lambda line: next((int(v) for v in line if v), 0)  # noqa: E731
            for r, c in zip(*np.nonzero(changed)):
                e = {nearest(p.input[r, :c][::-1]), nearest(p.input[r, c + 1:]), nearest(p.input[:r, c][::-1]),
                     nearest(p.input[r + 1:, c])}
                assert len(e) == 1 and 0 not in e
                edge = edge or e.pop()
        assert inside is not None and inside != edge


def test_output_sizes_per_family():
    for name, fam in FAMILIES.items():
        for t in _tasks(name, 5):
            for p in t.train + t.test:
                h, w = p.input.shape
                assert 3 <= min(h, w) and max(h, w) <= 6
                expect = {"rotate": (w, h), "transpose": (w, h), "scale2": (2 * h, 2 * w), "tile": (h, 2 * w)}
                if name in expect:
                    assert p.output.shape == expect[name]
                elif name != "crop":
                    assert p.output.shape == (h, w)


def test_ladder_is_deterministic_and_streams_are_disjoint():
    a = ladder(["identity", "mirror"], 4, (3, 5), seed=1)
    b = ladder(["identity", "mirror"], 4, (3, 5), seed=1)
    assert [t.to_json() for t in a] == [t.to_json() for t in b]
    held_out = ladder(["identity", "mirror"], 4, (3, 5), seed=1, stream=1)
    seen = {json.dumps(t.to_json()) for t in a}
    assert not seen & {json.dumps(t.to_json()) for t in held_out}
    assert [family_of(t.id) for t in a] == ["identity"] * 4 + ["mirror"] * 4


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="unknown family nope"):
        ladder(["nope"], 1, (3, 4), 0)
    with pytest.raises(ValueError, match="sides 5-3"):
        ladder(["identity"], 1, (5, 3), 0)
    with pytest.raises(ValueError, match="expected A-B"):
        parse_sides("x")


def test_cli_writes_a_loadable_source(tmp_path, capsys):
    out = tmp_path / "ladder"
    assert main(["data", "synth", "--out", str(out), "--families", "identity,crop", "--tasks", "3",
                 "--eval-tasks", "2", "--sides", "3-4", "--seed", "5"]) == 0
    src = load_source(out)
    assert len(src.split("train")) == 6 and len(src.split("eval")) == 4
    assert "6 training and 4 evaluation tasks" in capsys.readouterr().out
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--families", "bogus"]) == 2
