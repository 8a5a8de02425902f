"""The subset of Markdown fedxr's report and model cards use, rendered to escaped HTML for the console."""

from __future__ import annotations

import html
import re
from typing import Callable


def markdown_to_html(text: str, image_url: Callable[[str], str | None]) -> str:
    """The subset of Markdown fedxr's report and model cards use (headings, tables, images, code blocks, bullet
    lists, a quoted banner, paragraphs), escaped; images are shown only when ``image_url`` maps them to a file
    the console serves."""
    out: list[str] = []
    table: list[str] = []
    items: list[str] = []
    code: list[str] | None = None

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", s)

    def flush_table():
        if table:
            rows = [r for r in table if not re.match(r"^\|[-:|\s]+\|$", r)]
            cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
            if not cells:
                table.clear()
                return
            head = "".join(f"<th>{inline(c)}</th>" for c in cells[0])
            body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            table.clear()

    def flush_items():
        if items:
            out.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in text.splitlines():
        if code is not None:
            if line.startswith("```"):
                out.append("<pre>" + html.escape("\n".join(code)) + "</pre>")
                code = None
            else:
                code.append(line)
            continue
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("- "):
            items.append(line[2:])
            continue
        flush_items()
        if line.startswith("> "):
            out.append(f'<p class="error banner">{inline(line[2:])}</p>')
        elif line.startswith("```"):
            code = []
        elif m := re.match(r"^(#{1,4}) (.*)$", line):
            level = len(m.group(1)) + 1  # the page has its own h1
            out.append(f"<h{level}>{inline(m.group(2))}</h{level}>")
        elif m := re.match(r"^!\[([^\]]*)\]\(([^)]+)\)$", line.strip()):
            url = image_url(m.group(2))
            if url:
                out.append(f'<img src="{html.escape(url)}" alt="{html.escape(m.group(1))}">')
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush_table()
    flush_items()
    if code is not None:  # an unclosed code block: show what it holds
        out.append("<pre>" + html.escape("\n".join(code)) + "</pre>")
    return "\n".join(out)
