"""Self-contained HTML reports: a few building blocks that every report (and the main job's) reuses.

One file, no external assets: CSS inline, plots as base64 PNG. Every piece of text that may come
from a model or a user goes through ``esc`` -- model output is untrusted.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import math
from typing import Any, Iterable, Sequence

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.banner{padding:.7em 1em;border-radius:4px;margin:1em 0}.warn{background:#fff3cd;border:1px solid #e0c36a}
.error{background:#f8d7da;border:1px solid #d9a0a6}.info{background:#e7f1fb;border:1px solid #a9c7e8}
pre.sample{white-space:pre-wrap;background:#fafafa;border:1px solid #eee;padding:.4em;margin:0;max-height:12em;overflow:auto}
.note{color:#666;font-size:.9em}img{max-width:100%}
"""


def esc(value: Any) -> str:
    """HTML-escape anything (model text, file names, numbers)."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table: floats to ``digits`` significant digits, None/NaN as a dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "&ndash;"
    if isinstance(value, float):
        return esc(f"{value:.{digits}g}")
    return esc(value)


def fmt_ci(ci: Sequence[float] | None, digits: int = 3) -> str:
    if not ci or any(c is None for c in ci):
        return "&ndash;"
    return f"[{fmt(float(ci[0]), digits)}, {fmt(float(ci[1]), digits)}]"


def fmt_rate(rate: dict | None) -> str:
    """A ``{"rate", "ci"}`` entry as ``12.5 % [8.1, 18.3]``."""
    if not rate or rate.get("rate") is None or not math.isfinite(rate["rate"]):
        return "&ndash;"
    low, high = rate["ci"]
    return esc(f"{100 * rate['rate']:.1f} % [{100 * low:.1f}, {100 * high:.1f}]")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], raw: bool = False) -> str:
    """An HTML table. Cells are escaped unless ``raw`` (for cells already formatted with ``fmt``)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            numeric = isinstance(cell, (int, float)) and not isinstance(cell, bool)
            text = cell if raw else (fmt(cell) if numeric or cell is None else esc(cell))
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def banner(text: str, level: str = "warn") -> str:
    """A highlighted line (``warn``, ``error`` or ``info``); ``text`` is escaped."""
    return f'<div class="banner {esc(level)}">{esc(text)}</div>'


def paragraph(text: str, note: bool = False) -> str:
    return f'<p class="note">{esc(text)}</p>' if note else f"<p>{esc(text)}</p>"


def sample_text(text: str) -> str:
    """Model output shown verbatim (escaped, whitespace kept)."""
    return f'<pre class="sample">{esc(text)}</pre>'


def figure(fig, alt: str = "plot") -> str:
    """A matplotlib figure as an inline base64 PNG (the figure is closed afterwards)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def section(title: str, *parts: str) -> str:
    """A titled section from already-built HTML parts."""
    return f"<section><h2>{esc(title)}</h2>{''.join(parts)}</section>"


def page(title: str, *sections: str) -> str:
    """A complete, self-contained HTML document."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>{''.join(sections)}</body></html>\n")


def plots_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


NO_PLOTS = paragraph("Plots need matplotlib (pip install 'preftune[plots]').", note=True)
