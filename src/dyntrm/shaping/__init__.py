"""Routing shapers: ``none``, ``sars`` (default) and ``fars``, selected by ``shaping.kind``."""

from .base import Shaper
from .fars import FARS
from .sars import SARS, learning_cost

SHAPERS = {"none": Shaper, "sars": SARS, "fars": FARS}


def make_shaper(cfg, model, rt, optimizer=None) -> Shaper:
    return SHAPERS[cfg.shaping.kind](cfg, model, rt, optimizer)


__all__ = ["FARS", "SARS", "SHAPERS", "Shaper", "learning_cost", "make_shaper"]
