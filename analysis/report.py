"""Self-contained reports: one Markdown file and one HTML file with the figures beside them.

The HTML is rendered from the same Markdown by a converter for the small subset
mer writes (headings, paragraphs, pipe tables, images, code blocks, lists), so
the report opens in any browser with no extra package and says exactly what the
Markdown says.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from mer.atomic import write_text_atomic

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}code,pre{background:#f6f6f6;padding:1px 4px}
pre{padding:8px;overflow-x:auto}
"""


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', out)
    return out


def markdown_to_html(md: str, title: str) -> str:
    lines = md.splitlines()
    body: list[str] = []
    i = 0
    para: list[str] = []

    def flush() -> None:
        if para:
            body.append("<p>" + _inline(" ".join(para)) + "</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            block = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                block.append(lines[i])
                i += 1
            body.append("<pre>" + html.escape("\n".join(block)) + "</pre>")
        elif m := re.match(r"^(#{1,4}) (.*)", stripped):
            flush()
            n = len(m.group(1))
            body.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
        elif m := re.match(r"^!\[([^\]]*)\]\(([^)]+)\)$", stripped):
            flush()
            body.append(f'<img src="{html.escape(m.group(2))}" alt="{html.escape(m.group(1))}">')
        elif stripped.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            i -= 1
            header, data = (
                rows[0],
                [r for r in rows[1:] if not all(set(c) <= set("-: ") for c in r)],
            )
            t = ["<table>", "<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in header) + "</tr>"]
            for r in data:
                cells = "".join(
                    f'<td class="num">{_inline(c)}</td>'
                    if re.match(r"^[-+]?[\d,.]+%?$", c)
                    else f"<td>{_inline(c)}</td>"
                    for c in r
                )
                t.append(f"<tr>{cells}</tr>")
            t.append("</table>")
            body.append("\n".join(t))
        elif stripped.startswith("- "):
            flush()
            items = []
            while i < len(lines) and lines[i].strip().startswith("- "):
                items.append(f"<li>{_inline(lines[i].strip()[2:])}</li>")
                i += 1
            i -= 1
            body.append("<ul>" + "".join(items) + "</ul>")
        elif not stripped:
            flush()
        else:
            para.append(stripped)
        i += 1
    flush()
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(out_dir: str | Path, name: str, markdown: str, title: str) -> tuple[Path, Path]:
    """Write NAME.md and NAME.html into out_dir (atomically); figures are referenced relatively."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / f"{name}.md"
    html_path = out / f"{name}.html"
    write_text_atomic(md_path, markdown)
    write_text_atomic(html_path, markdown_to_html(markdown, title))
    return md_path, html_path


def md_table(header: list[str], rows: list[list[object]]) -> str:
    """A pipe table; numbers right-aligned."""

    def align(cells: list[object]) -> str:
        return "|" + "|".join("---:" if isinstance(c, int | float) else "---" for c in cells) + "|"

    lines = [
        "| " + " | ".join(header) + " |",
        align(rows[0]) if rows else "|" + "---|" * len(header),
    ]
    for r in rows:
        lines.append("| " + " | ".join(_cell(c) for c in r) + " |")
    return "\n".join(lines)


def _cell(c: object) -> str:
    if isinstance(c, float):
        if c != c:
            return "-"
        return f"{c:,.4g}" if abs(c) < 1e5 else f"{c:,.0f}"
    if isinstance(c, int):
        return f"{c:,}"
    return str(c)
