"""Self-contained HTML reports: each task's test input, target, the two attempts and the vote counts as grids,
plus training curves and metrics when a run is reported; answers that test-time training changed are marked,
beside the attempt the model gave without it. Grids are drawn as HTML tables in the ARC palette (no
image files needed); curve pictures are embedded as PNG data."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .io import write_text
from .scoring import solved
from .viz import ARC_COLOURS

CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
table.grid { border-collapse: collapse; display: inline-block; vertical-align: top; margin: 2px; }
table.grid td { width: 10px; height: 10px; padding: 0; border: 1px solid #555; }
.panel { display: inline-block; margin: 0 12px 8px 0; vertical-align: top; font-size: 12px; }
.ok { color: #1a7f37; font-weight: bold; } .miss { color: #b42318; }
.task { border-top: 1px solid #ddd; padding: 8px 0; }
.changed { background: #fff3c4; padding: 0 4px; }
table.metrics td, table.metrics th { padding: 2px 10px; text-align: right; border-bottom: 1px solid #eee; }
"""


def grid_html(grid: np.ndarray | None) -> str:
    if grid is None:
        return "<em>none</em>"
    g = np.asarray(grid)
    rows = "".join("<tr>" + "".join(f'<td style="background:{ARC_COLOURS[int(c)]}"></td>' for c in row) + "</tr>"
                   for row in g)
    return f'<table class="grid" title="{g.shape[0]}x{g.shape[1]}">{rows}</table>'


def panel(title: str, grid: np.ndarray | None) -> str:
    return f'<div class="panel">{html.escape(title)}<br>{grid_html(grid)}</div>'


def image_html(path: str | os.PathLike, width: int = 900) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" width="{width}">'


def metrics_table(rows: dict[str, Any]) -> str:
    cells = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th><td>{html.escape(fmt(v))}</td></tr>"
                    for k, v in rows.items())
    return f'<table class="metrics">{cells}</table>'


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def ttt_changed(results: Sequence[Any], without_ttt: Sequence[Any]) -> dict[tuple[str, int], Any]:
    """The results whose two attempts differ from the same test input's without test-time training, keyed by
    (task, test index), each mapped to its result without TTT."""
    before = {(r.item.task_id, r.item.index): r for r in without_ttt}
    out = {}
    for r in results:
        b = before.get((r.item.task_id, r.item.index))
        if b is not None and any(not np.array_equal(x, y) for x, y in zip(r.attempts[:2], b.attempts[:2])):
            out[(r.item.task_id, r.item.index)] = b
    return out


def results_html(results: Sequence[Any], without_ttt: Sequence[Any] = ()) -> str:
    """One block per test input: input, target, attempts (marked right or wrong) and vote counts; with
    ``without_ttt``, the answers TTT changed are marked and shown beside the attempt given without it."""
    changed = ttt_changed(results, without_ttt)
    parts = []
    for r in sorted(results, key=lambda r: (r.item.task_id, r.item.index)):
        it = r.item
        status = ""
        if it.target is not None:
            ok = solved(r.attempts, it.target, 2)
            status = '<span class="ok">solved (pass@2)</span>' if ok else '<span class="miss">not solved</span>'
        votes = ", ".join(str(c.votes) for c in r.ranked[:6]) or "no valid candidate"
        panels = panel("test input", it.input) + panel("target", it.target)
        for i, a in enumerate(r.attempts[:2]):
            mark = ""
            if it.target is not None:
                mark = " ✓" if np.array_equal(a, it.target) else " ✗"
            v = r.ranked[i].votes if i < len(r.ranked) else 0
            panels += panel(f"attempt {i + 1} ({v} votes){mark}", a)
        before = changed.get((it.task_id, it.index))
        if before is not None:
            was = "" if it.target is None else (" (was solved)" if solved(before.attempts, it.target, 2)
                                                else " (was not solved)")
            status += f' <span class="changed">changed by TTT{was}</span>'
            panels += panel("attempt 1 without TTT", before.attempts[0])
        steps = f"{np.mean(r.steps):.2f}" if r.steps else "-"
        parts.append(f'<div class="task"><b>{html.escape(it.task_id)}</b> test {it.index} {status} '
                     f'&middot; votes per candidate: {votes} &middot; mean ACT steps {steps}<br>{panels}</div>')
    return "\n".join(parts)


def write_report(path: str | os.PathLike, title: str, *, summary: dict[str, Any], results: Sequence[Any] = (),
                 images: Sequence[str | os.PathLike] = (), notes: str = "", without_ttt: Sequence[Any] = ()) -> Path:
    body = [f"<h1>{html.escape(title)}</h1>"]
    if notes:
        body.append(f"<p>{html.escape(notes)}</p>")
    body.append(metrics_table(summary))
    for img in images:
        if Path(img).exists():
            body.append(f"<p>{image_html(img)}</p>")
    if results:
        body.append("<h2>Test inputs</h2>")
        body.append(results_html(results, without_ttt))
    doc = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>" \
          f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    return write_text(path, doc)
