"""Notebook displays: every result object shows itself in Jupyter as a small card.

A class mixes in :class:`Rich` and says what it is through three hooks: :meth:`Rich._fields`
(name, value pairs: shapes, model, site, layers, provenance), :meth:`Rich._table` (a header and
rows: the top entries) and :meth:`Rich._figure` (a matplotlib figure where a picture beats a
table). From those, ``_repr_mimebundle_`` gives ``text/plain`` (the same card as text),
``text/html`` and ``image/png``. The HTML is a plain table with inline styles and the figure
inlined as a ``data:`` URI: no JavaScript, nothing fetched, no ``<style>`` block that a
sanitising viewer (GitHub's) would strip, so it reads the same in JupyterLab, VS Code, Colab and
static viewers. Figures are closed once rendered, so they never show twice.

>>> class Point(Rich):
...     def _fields(self): return [("x", 1), ("y", "two")]
...     def _table(self): return ["k", "v"], [["a", 0.5]]
>>> print(Point()._text())
Point
  x: 1
  y: two
  k       v
  a  0.5000
>>> sorted(Point()._repr_mimebundle_())
['text/html', 'text/plain']
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Optional, Sequence

__all__ = ["Rich", "figure_png", "html_table", "fmt"]

_FONT = "font-family: ui-sans-serif, system-ui, sans-serif; font-size: 12px; line-height: 1.35"
_CELL = "padding: 2px 8px; text-align: right; border-bottom: 1px solid #ddd"
_HEAD = "padding: 2px 8px; text-align: right; border-bottom: 1px solid #888; font-weight: 600"


def fmt(v: Any) -> str:
    """A value as a short string: floats to 4 decimals (or 4 significant digits when tiny or huge),
    long lists elided.

    >>> fmt(0.123456), fmt(12345.6), fmt(list(range(10)))
    ('0.1235', '1.235e+04', '[0, 1, 2, …, 8, 9] (10)')
    """
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.4g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-3) else f"{v:.4f}"
    if isinstance(v, (list, tuple)) and len(v) > 8:
        return f"[{', '.join(fmt(x) for x in v[:3])}, …, {', '.join(fmt(x) for x in v[-2:])}] ({len(v)})"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> str:
    """A plain HTML table (inline styles; first column and text left-aligned).

    >>> html_table(["layer", "score"], [[0, 0.5]]).count("<tr>")
    2
    """
    def cell(v, tag, style, i):
        align = "; text-align: left" if i == 0 or not isinstance(v, (int, float)) else ""
        return f'<{tag} style="{style}{align}">{html.escape(fmt(v))}</{tag}>'

    head = "".join(cell(h, "th", _HEAD, i) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell(v, "td", _CELL, i) for i, v in enumerate(r)) + "</tr>" for r in rows)
    cap = f'<caption style="text-align: left; color: #555">{html.escape(caption)}</caption>' if caption else ""
    return f'<table style="border-collapse: collapse; margin: 4px 0">{cap}<tr>{head}</tr>{body}</table>'


def figure_png(fig, dpi: int = 100) -> bytes:
    """PNG bytes of a matplotlib figure, which is then closed (so a notebook does not show it twice).

    >>> import matplotlib.pyplot as plt
    >>> fig = plt.figure()
    >>> figure_png(fig)[:4], plt.fignum_exists(fig.number)
    (b'\\x89PNG', False)
    """
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def png_img(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG inlined as a data URI."""
    b64 = base64.b64encode(png).decode()
    return f'<img alt="{html.escape(alt)}" style="max-width: 100%" src="data:image/png;base64,{b64}">'


class Rich:
    """Mixin: a text card for ``repr`` and a CSS-only HTML card with an optional figure for notebooks."""

    def _fields(self) -> list[tuple[str, Any]]:
        return []

    def _table(self) -> Optional[tuple[Sequence[str], Sequence[Sequence[Any]]]]:
        return None

    def _figure(self):
        """The card's picture: the object's own ``plot()`` where it has one."""
        plot = getattr(self, "plot", None)
        return plot() if callable(plot) else None

    def _title(self) -> str:
        return type(self).__name__

    def _text(self) -> str:
        lines = [self._title()]
        lines += [f"  {k}: {fmt(v)}" for k, v in self._fields()]
        t = self._table()
        if t is not None:
            header, rows = t
            cells = [[fmt(h) for h in header]] + [[fmt(v) for v in r] for r in rows]
            widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
            numeric = [all(isinstance(r[i], (int, float)) for r in rows) for i in range(len(header))]
            for r in cells:
                lines.append("  " + "  ".join(c.rjust(w) if i and numeric[i] else c.ljust(w)
                                              for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self._text()

    def _html(self, png: Optional[bytes] = None) -> str:
        fields = "".join(
            f'<tr><td style="padding: 1px 10px 1px 0; color: #555">{html.escape(k)}</td>'
            f'<td style="padding: 1px 0">{html.escape(fmt(v))}</td></tr>' for k, v in self._fields())
        t = self._table()
        text = "".join([f'<div style="font-weight: 600; margin-bottom: 2px">{html.escape(self._title())}</div>',
                        f'<table style="border-collapse: collapse">{fields}</table>' if fields else "",
                        html_table(*t) if t is not None else ""])
        picture = f'<div style="flex: 1 1 360px; max-width: 560px">{png_img(png, self._title())}</div>' if png else ""
        return (f'<div style="{_FONT}; border-left: 3px solid #0072B2; padding: 4px 10px; display: flex; '
                f'flex-wrap: wrap; gap: 12px; align-items: flex-start"><div>{text}</div>{picture}</div>')

    def _repr_html_(self) -> str:
        return self._html(self._png())

    def _png(self) -> Optional[bytes]:
        fig = self._figure()
        return None if fig is None else figure_png(fig)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        png = self._png()
        out = {"text/plain": self._text(), "text/html": self._html(png)}
        if png is not None:
            out["image/png"] = png
        return out
