"""What featx objects show in Jupyter: small HTML tables, every value escaped, and PNGs inline.

A file name or a class name is the user's text and may hold markup: it is escaped here, once, for every
``_repr_html_``.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path


def html_table(header: list[str], rows: list[list], marked: int | None = None, caption: str = "") -> str:
    """A table of ``rows`` under ``header``; row ``marked`` in bold with a ★ (the best, in a leaderboard)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f"<td>{html.escape(str(c))}</td>" for c in row)
        style = ' style="font-weight:bold"' if i == marked else ""
        body.append(f"<tr{style}>{cells}</tr>")
    title = f"<caption style='text-align:left;white-space:nowrap'>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def definition_list(items: dict) -> str:
    """``name: value`` lines, escaped, for provenance."""
    lines = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in items.items())
    return f"<ul style='margin:0.3em 0'>{lines}</ul>"


def inline_png(path: Path, width: int = 640) -> str:
    """An ``<img>`` holding the PNG at ``path`` (a notebook keeps no reference to the run folder)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" style="max-width:{width}px" alt="{html.escape(Path(path).name)}">'
