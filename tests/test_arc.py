"""Loading and validating ARC sources: the bundled data, the file formats, and every kind of bad input."""

import json

import numpy as np
import pytest

from dyntrm.cli import main
from dyntrm.data.arc import ArcDataError, load_source, load_task_file
from helpers import assert_user_error, cli

GOOD = {"train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}],
        "test": [{"input": [[5, 6], [7, 8]], "output": [[8, 7], [6, 5]]}]}


def test_bundled_arc1_counts():
    src = load_source("arc1")
    assert len(src.split("train")) == 400
    assert len(src.split("eval")) == 400
    t = src.find("007bbfb7")  # a well-known ARC-AGI-1 training task: 3x3 -> 9x9
    assert t.train[0].input.shape == (3, 3) and t.train[0].output.shape == (9, 9)
    assert all(p.output is not None for t in src.split("eval") for p in t.test)


def test_bundled_arc2_counts():
    src = load_source("arc2")
    assert len(src.split("train")) == 1000
    assert len(src.split("eval")) == 120


def test_task_directory_and_single_file(tmp_tasks, tmp_path):
    tmp_tasks("aaa", GOOD)
    tmp_tasks("bbb", GOOD)
    src = load_source(tmp_path)
    assert list(src.splits) == ["all"] and [t.id for t in src.split("all")] == ["aaa", "bbb"]
    t = load_task_file(tmp_path / "aaa.json")
    np.testing.assert_array_equal(t.test[0].output, [[8, 7], [6, 5]])
    assert load_source(tmp_path / "bbb.json").find("bbb").id == "bbb"


def test_arc_repo_layout(tmp_path):
    for d in ("training", "evaluation"):
        (tmp_path / d).mkdir()
        (tmp_path / d / f"{d[:4]}0001.json").write_text(json.dumps(GOOD))
    src = load_source(tmp_path)
    assert sorted(src.splits) == ["eval", "train"]
    assert src.split("eval")[0].id == "eval0001"


def test_kaggle_pair(tmp_path):
    demos = [{"input": [[i]], "output": [[i, i]]} for i in range(3)]  # more demonstrations than test inputs
    ch = {"t1": {"train": demos, "test": [{"input": [[1]]}, {"input": [[2]]}]}}
    (tmp_path / "arc-agi_evaluation_challenges.json").write_text(json.dumps(ch))
    (tmp_path / "arc-agi_evaluation_solutions.json").write_text(json.dumps({"t1": [[[3]], [[4]]]}))
    (tmp_path / "arc-agi_test_challenges.json").write_text(json.dumps(ch))  # no solutions: outputs unknown
    src = load_source(tmp_path)
    t = src.split("eval")[0]
    assert [p.output.tolist() for p in t.test] == [[[3]], [[4]]]
    assert [p.output.tolist() for p in t.train] == [[[i, i]] for i in range(3)]  # demonstrations untouched
    assert all(p.output is None for p in src.split("test")[0].test)


def test_kaggle_solution_count_mismatch(tmp_path):
    ch = {"t1": {"train": GOOD["train"], "test": [{"input": [[1]]}]}}
    (tmp_path / "x_training_challenges.json").write_text(json.dumps(ch))
    (tmp_path / "x_training_solutions.json").write_text(json.dumps({"t1": [[[3]], [[4]]]}))
    with pytest.raises(ArcDataError, match=r"task t1: 2 solutions for 1 test inputs"):
        load_source(tmp_path)


def _with(pair_kind, index, key, value):
    task = json.loads(json.dumps(GOOD))
    task[pair_kind][index][key] = value
    return task


BAD = [
    # (name, task or raw text, expected pieces of the message)
    ("ragged", _with("train", 0, "input", [[1, 2], [3]]), ["train[0].input", "ragged grid: row 1 has 1 cells"]),
    ("colour10", _with("test", 0, "output", [[1, 10]]), ["test[0].output", "cell (0, 1) is 10"]),
    ("colour_neg", _with("train", 0, "output", [[-1]]), ["train[0].output", "cell (0, 0) is -1"]),
    ("colour_float", _with("train", 0, "output", [[1.5]]), ["train[0].output", "cell (0, 0) is 1.5"]),
    ("colour_bool", _with("train", 0, "output", [[True]]), ["train[0].output", "cell (0, 0) is True"]),
    ("cols31", _with("test", 0, "input", [[0] * 31]), ["test[0].input", "31 columns"]),
    ("rows31", _with("test", 0, "input", [[0]] * 31), ["test[0].input", "31 rows"]),
    ("empty_grid", _with("train", 0, "input", []), ["train[0].input", "non-empty"]),
    ("empty_row", _with("train", 0, "input", [[]]), ["train[0].input", "row 0 must be a non-empty"]),
    ("no_train", {"train": [], "test": GOOD["test"]}, ["no training pair"]),
    ("no_test", {"train": GOOD["train"], "test": []}, ["no test input"]),
    ("missing_train_key", {"test": GOOD["test"]}, ["missing key 'train'"]),
    ("missing_output", {"train": [{"input": [[1]]}], "test": GOOD["test"]}, ["train[0]", "missing key 'output'"]),
    ("missing_input", {"train": [{"output": [[1]]}], "test": GOOD["test"]}, ["train[0]", "missing key 'input'"]),
]


@pytest.mark.parametrize("name,task,pieces", BAD, ids=[b[0] for b in BAD])
def test_malformed_task_names_file_task_and_pair(tmp_tasks, name, task, pieces):
    path = tmp_tasks(name, task)
    with pytest.raises(ArcDataError) as info:
        load_task_file(path)
    msg = str(info.value)
    assert str(path) in msg and f"task {name}" in msg
    for piece in pieces:
        assert piece in msg


def test_invalid_json_names_file_and_line(tmp_tasks):
    path = tmp_tasks("broken", None, raw='{\n  "train": [\n    {"input": [[1]], }\n  ]\n}')
    with pytest.raises(ArcDataError) as info:
        load_task_file(path)
    assert str(path) in str(info.value) and "line 3" in str(info.value)


def test_bad_task_inside_a_directory_is_named(tmp_tasks, tmp_path):
    tmp_tasks("good", GOOD)
    tmp_tasks("zbad", _with("train", 0, "output", [[1, 2], [3]]))
    with pytest.raises(ArcDataError, match=r"zbad\.json: task zbad: train\[0\]\.output: ragged"):
        load_source(tmp_path)


def test_cli_reports_bad_input_without_traceback(tmp_tasks, tmp_path, capsys):
    tmp_tasks("bad", _with("test", 0, "input", [[0] * 31]))
    assert main(["data", "stats", "--source", str(tmp_path)]) == 2
    out = capsys.readouterr()
    text = out.out + out.err
    assert "error:" in text and "task bad" in text and "test[0].input" in text
    assert "Traceback" not in text


def test_cli_unknown_task_and_missing_source(capsys, tmp_path):
    assert_user_error(cli(capsys, "show", "arc1", "nope", "--out", tmp_path / "x.png"), "no task 'nope'")
    assert_user_error(cli(capsys, "data", "stats", "--source", tmp_path / "missing"), "no such file or directory")


def test_cli_stats_and_show(capsys, tmp_path):
    assert main(["data", "stats", "--source", "arc1", "--max-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "400" in out and "exceed max_len=2048" in out
    png = tmp_path / "task.png"
    assert main(["show", "arc1", "007bbfb7", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("raw,words", [
    ('{"train": [{"input": [[' + "7" * 5000 + ']], "output": [[1]]}], "test": [{"input": [[1]]}]}',
     "a number too long to read"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_hostile_json_is_a_one_line_error(tmp_tasks, capsys, raw, words):
    """A 5000-digit integer (over Python's int-parsing limit) and 100k-deep nesting (over the recursion limit)."""
    path = tmp_tasks("hostile", None, raw=raw)
    with pytest.raises(ArcDataError, match=words):
        load_task_file(path)
    assert_user_error(cli(capsys, "data", "stats", "--source", path), str(path), words)


def test_two_challenges_files_of_one_split_are_refused_naming_both(tmp_path):
    ch = {"t1": GOOD}
    for prefix in ("arc-agi", "arc-prize-2025"):
        (tmp_path / f"{prefix}_evaluation_challenges.json").write_text(json.dumps(ch))
    with pytest.raises(ArcDataError, match=r"arc-agi_evaluation_challenges.json and "
                                           r"arc-prize-2025_evaluation_challenges.json.*split 'eval'"):
        load_source(tmp_path)


def test_a_file_of_many_tasks_given_as_one_says_what_it_is_and_how_to_pass_it(tmp_path, capsys):
    path = tmp_path / "arc-agi_test_challenges.json"
    path.write_text(json.dumps({"t1": GOOD, "t2": GOOD}))
    with pytest.raises(ArcDataError, match="a file of 2 tasks"):
        load_task_file(path)
    assert_user_error(cli(capsys, "predict", tmp_path / "run", path), str(path), "a file of 2 tasks",
                      f"dyntrm eval RUN --source {path}")
