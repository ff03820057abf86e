"""Regenerate the tiny hand-made tasks in tests/assets/tasks/ (deterministic; run from the repo root).

Six transformations of 3x3-5x5 grids, 3 demonstrations and 1 test pair each: small enough for the `debug` preset.
"""

import json
from pathlib import Path

import numpy as np

RULES = {
    "identity": lambda g: g,
    "flip_lr": lambda g: g[:, ::-1],
    "flip_ud": lambda g: g[::-1, :],
    "transpose": lambda g: g.T,
    "swap12": lambda g: np.where(g == 1, 2, np.where(g == 2, 1, g)),
    "fill_background_3": lambda g: np.where(g == 0, 3, g),
}


def main() -> None:
    rng = np.random.default_rng(1234)
    out = Path(__file__).parent / "tasks"
    out.mkdir(exist_ok=True)
    for name, rule in RULES.items():
        pairs = []
        for _ in range(4):
            h, w = rng.integers(3, 6, 2)
            g = rng.choice([0, 0, 1, 2, 5], size=(h, w))
            pairs.append({"input": g.tolist(), "output": rule(g).tolist()})
        (out / f"{name}.json").write_text(json.dumps({"train": pairs[:3], "test": pairs[3:]}) + "\n")


if __name__ == "__main__":
    main()
