"""A self-contained HTML report: one file, images inlined, every number in a table, no JavaScript.

``steer demo`` writes one (``DIR/index.html``); any script can build its own:

>>> import tempfile, os
>>> r = Report("My experiment", "what it shows")
>>> s = r.section("Numbers", "One sentence on what this section shows.")
>>> s.table(["layer", "accuracy"], [[0, 0.5], [1, 0.75]])
>>> path = r.write(os.path.join(tempfile.mkdtemp(), "index.html"))
>>> "<script" in open(path).read(), "0.7500" in open(path).read()
(False, True)
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence, Union

from .display import figure_png, html_table, png_img

__all__ = ["Report", "Section"]

_CSS = """
body { font-family: ui-sans-serif, system-ui, sans-serif; font-size: 14px; line-height: 1.45;
       max-width: 1100px; margin: 24px auto; padding: 0 16px; color: #222; }
h1 { font-size: 22px; margin-bottom: 2px; } h2 { font-size: 17px; margin: 28px 0 4px; border-bottom: 1px solid #ddd; }
p.what { color: #444; margin: 2px 0 8px; } p.sub { color: #666; margin-top: 0; }
table { font-size: 12px; } td, th { vertical-align: top; }
.side { display: grid; gap: 8px; } .side td { max-width: 320px; white-space: pre-wrap; text-align: left !important; }
figure { margin: 8px 0; } figcaption { color: #555; font-size: 12px; }
"""


class Section:
    """One section: a title, a sentence saying what it shows, then images, tables and text."""

    def __init__(self, title: str, what: str):
        self.title, self.what = title, what
        self.parts: list[str] = []

    def text(self, s: str) -> None:
        self.parts.append(f"<p>{html.escape(s)}</p>")

    def image(self, source: Union[str, Path, bytes, Any], caption: str = "") -> None:
        """A PNG file, PNG bytes or a matplotlib figure (closed after), inlined as a data URI."""
        if isinstance(source, (str, Path)):
            png = Path(source).read_bytes()
        elif isinstance(source, bytes):
            png = source
        else:
            png = figure_png(source, dpi=110)
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(f"<figure>{png_img(png, caption or self.title)}{cap}</figure>")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> None:
        self.parts.append(html_table(header, rows, caption))

    def side_by_side(self, header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> None:
        """A table of texts (generations), wrapped, one column per setting."""
        self.parts.append(f'<div class="side">{html_table(header, rows, caption)}</div>')

    def html(self) -> str:
        return (f"<section><h2>{html.escape(self.title)}</h2><p class=\"what\">{html.escape(self.what)}</p>"
                + "".join(self.parts) + "</section>")


class Report:
    """Sections in order, written as one HTML file."""

    def __init__(self, title: str, subtitle: str = ""):
        self.title, self.subtitle = title, subtitle
        self.sections: list[Section] = []

    def section(self, title: str, what: str) -> Section:
        s = Section(title, what)
        self.sections.append(s)
        return s

    def html(self) -> str:
        sub = f'<p class="sub">{html.escape(self.subtitle)}</p>' if self.subtitle else ""
        body = "".join(s.html() for s in self.sections)
        return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head>"
                f"<body><h1>{html.escape(self.title)}</h1>{sub}{body}</body></html>")

    def write(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.html(), encoding="utf-8")
        return path
