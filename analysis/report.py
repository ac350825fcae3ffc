"""Self-contained reports: one Markdown file and one HTML file with the figures beside them.

The HTML is rendered from the same Markdown by a converter for the small subset
mer writes (headings, paragraphs, pipe tables, images with their caption line,
code blocks, lists), so the report opens in any browser with no extra package
and says exactly what the Markdown says. The page never scrolls sideways:
text, code and tables wrap, wide tables scroll inside their own box, images
shrink to the column.

Tables name their columns for people (`COLUMN_LABELS`, `human`): a results
field gets its label and unit here once, and every report uses it. A section
that adds a column adds its label here (one line).
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from mer.atomic import write_text_atomic

_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45;overflow-wrap:anywhere}
.table{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;margin:0.6em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:3px 7px;vertical-align:top}
th{background:#f3f3f3;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
figure{margin:1em 0;max-width:100%}figure img{display:block;max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:0.9em;color:#444;margin-top:0.3em}
img{max-width:100%;height:auto}code{background:#f6f6f6;padding:1px 4px;overflow-wrap:anywhere}
pre{background:#f6f6f6;padding:8px;white-space:pre-wrap;overflow-wrap:anywhere;font-size:0.85em}
p.window{color:#555;font-size:0.92em;font-style:italic}
"""


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"<em>\1</em>", out)
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
            img = f'<img src="{html.escape(m.group(2))}" alt="{html.escape(m.group(1))}">'
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if nxt.startswith("*Figure"):
                body.append(f"<figure>{img}<figcaption>{_inline(nxt)}</figcaption></figure>")
                i += 1
            else:
                body.append(img)
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
            t = [
                '<div class="table"><table>',
                "<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in header) + "</tr>",
            ]
            for r in data:
                cells = "".join(
                    f'<td class="num">{_inline(c)}</td>'
                    if _NUMBER.match(c)
                    else f"<td>{_inline(c)}</td>"
                    for c in r
                )
                t.append(f"<tr>{cells}</tr>")
            t.append("</table></div>")
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
        elif m := re.match(r"^\*(Token window[^*]*)\*$", stripped):
            flush()
            body.append(f'<p class="window">{_inline(m.group(1))}</p>')
        else:
            para.append(stripped)
        i += 1
    flush()
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title>"
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


#: Results fields as people read them: label (unit). Rates are shown in percent.
COLUMN_LABELS: dict[str, str] = {
    "policy": "policy",
    "scope": "cache scope",
    "predictor": "predictor",
    "cache_slots": "cache (slots)",
    "hit_rate": "hit rate (%)",
    "miss_ratio": "miss ratio (%)",
    "tokens_per_s": "tokens/s",
    "layer_iterations_per_s": "layer iterations/s",
    "io_wait_share": "I/O wait (% of time)",
    "tokens": "tokens",
    "pipeline_depth": "prefetch depth",
    "hardware": "machine profile",
    "shape": "expert shape",
    "bytes_read": "bytes read",
    "prefetch_issued": "prefetches issued",
    "prefetch_used": "prefetches used",
    "prefetch_late": "prefetches late",
    "prefetch_wasted": "prefetches wasted",
    "tokens_per_s_per_gib": "tokens/s per GiB of cache",
    "cache_bytes": "cache (bytes)",
    "warm_hit_rate": "steady-state hit rate (%)",
    "warmup_tokens": "warm-up (tokens)",
    "lru_hit_rate": "LRU hit rate (%)",
    "opt_hit_rate": "OPT hit rate (%)",
    "gap_closed": "LRU->OPT gap closed (%)",
    "warm_gap_closed": "steady-state gap closed (%)",
    "tuned_on": "tuned on",
    "held_out": "held out",
    "prefetch_precision": "prefetch precision (%)",
    "prefetch_recall": "prefetch recall (%)",
    "prefetch_useful_bytes": "prefetch bytes useful",
    "prefetch_wasted_bytes": "prefetch bytes wasted",
    "prefetch_late_bytes": "prefetch bytes late",
    "prefetch_lead": "prefetch lead (steps)",
    "prefetch_slots": "prefetch slot budget",
}
#: Fields stored as fractions and shown in percent.
PERCENT_COLUMNS = {
    "hit_rate",
    "miss_ratio",
    "io_wait_share",
    "warm_hit_rate",
    "lru_hit_rate",
    "opt_hit_rate",
    "gap_closed",
    "warm_gap_closed",
    "prefetch_precision",
    "prefetch_recall",
}


def signed(value: float, digits: int = 1) -> str:
    """A difference or error with its sign always shown (+12.3, -0.4); '-' when undefined."""
    return "-" if value != value else f"{value:+.{digits}f}"


def human(column: str) -> str:
    """The label a person reads for a results field (the field itself when none is known)."""
    return COLUMN_LABELS.get(column, column.replace("_", " "))


def frame_rows(df: Any, columns: list[str]) -> tuple[list[str], list[list[object]]]:
    """Human header and cells for `columns` of a frame; fractions shown in percent."""
    cols = [c for c in columns if c in df.columns]
    rows = []
    for _, r in df.iterrows():
        row: list[object] = []
        for c in cols:
            v = r[c]
            if c in PERCENT_COLUMNS and v == v:
                v = float(v) * 100
            elif hasattr(v, "item"):
                v = v.item()
            row.append(v)
        rows.append(row)
    return [human(c) for c in cols], rows


def md_table(header: list[str], rows: list[list[object]]) -> str:
    """A pipe table; numbers right-aligned."""

    def align(cells: list[object]) -> str:
        return "|" + "|".join("---:" if _numeric(c) else "---" for c in cells) + "|"

    lines = [
        "| " + " | ".join(header) + " |",
        align(rows[0]) if rows else "|" + "---|" * len(header),
    ]
    for r in rows:
        lines.append("| " + " | ".join(_cell(c) for c in r) + " |")
    return "\n".join(lines)


_NUMBER = re.compile(r"^[-+]?[\d,.]+%?$")


def _numeric(c: object) -> bool:
    return isinstance(c, int | float) or (isinstance(c, str) and bool(_NUMBER.match(c)))


def _cell(c: object) -> str:
    if isinstance(c, float):
        if c != c:
            return "-"
        return f"{c:,.4g}" if abs(c) < 1e3 else f"{c:,.0f}"
    if isinstance(c, int):
        return f"{c:,}"
    return str(c)
