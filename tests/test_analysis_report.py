"""Reports: the Markdown subset becomes the right HTML structure; tables align; writes are atomic."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

from mer.analysis.report import markdown_to_html, md_table, write_report


class _Tree(HTMLParser):
    """Records (tag, attrs, text) of every element, and the nesting path of text."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None], list[str]]] = []
        self.stack: list[int] = []
        self.unclosed = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs), []))
        if tag not in ("img", "meta", "br"):
            self.stack.append(len(self.elements) - 1)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack, f"</{tag}> without an open element"
        top = self.elements[self.stack.pop()][0]
        assert top == tag, f"</{tag}> closes <{top}>"

    def handle_data(self, data: str) -> None:
        for i in self.stack:
            self.elements[i][2].append(data)

    def find(self, tag: str) -> list[tuple[dict[str, str | None], str]]:
        return [(a, "".join(t)) for g, a, t in self.elements if g == tag]


def _parse(html: str) -> _Tree:
    tree = _Tree()
    tree.feed(html)
    tree.close()
    assert not tree.stack, "unclosed elements"
    return tree


MD = """# Title with `code`

Some **bold** text and a [link](https://example.org/x).
Second line of the same paragraph.

## Section 2

| name | hits | rate |
|---|---:|---:|
| lru | 1,234 | 97.46% |
| a<b | 5 | -0.5 |

![the curves](figures/mrc.png)

```
| not a table |
# not a heading
x < y & z
```

- one
- two
"""


def test_markdown_to_html_structure() -> None:
    tree = _parse(markdown_to_html(MD, "Report & title"))
    assert tree.find("title")[0][1] == "Report & title"
    assert [t for _, t in tree.find("h1")] == ["Title with code"]
    assert [t for _, t in tree.find("h2")] == ["Section 2"]
    assert tree.find("code")[0][1] == "code"
    assert [t for _, t in tree.find("strong")] == ["bold"]
    links = tree.find("a")
    assert links[0][0]["href"] == "https://example.org/x" and links[0][1] == "link"
    paras = [t for _, t in tree.find("p")]
    assert "Some bold text and a link. Second line of the same paragraph." in paras
    # one table: header row, two data rows (the |---| rule is not a row)
    assert len(tree.find("table")) == 1
    assert [t for _, t in tree.find("th")] == ["name", "hits", "rate"]
    cells = tree.find("td")
    assert [t for _, t in cells] == ["lru", "1,234", "97.46%", "a<b", "5", "-0.5"]
    numeric = [t for a, t in cells if a.get("class") == "num"]
    assert numeric == ["1,234", "97.46%", "5", "-0.5"]
    img = tree.find("img")
    assert len(img) == 1 and img[0][0]["src"] == "figures/mrc.png"
    assert img[0][0]["alt"] == "the curves"
    # the code block is kept verbatim (escaped), not read as a table or heading
    pre = tree.find("pre")
    assert len(pre) == 1
    assert pre[0][1] == "| not a table |\n# not a heading\nx < y & z"
    assert [t for _, t in tree.find("li")] == ["one", "two"]
    assert len(tree.find("ul")) == 1


def test_md_table_alignment_and_cells() -> None:
    text = md_table(
        ["policy", "slots", "hit rate"], [["lru", 1024, 0.5], ["opt", 64, float("nan")]]
    )
    lines = text.splitlines()
    assert lines[0] == "| policy | slots | hit rate |"
    assert lines[1] == "|---|---:|---:|"  # text left, numbers right
    assert lines[2] == "| lru | 1,024 | 0.5 |"
    assert lines[3] == "| opt | 64 | - |"  # NaN shown as a dash
    # and it renders to a table whose numeric cells are right-aligned
    tree = _parse(markdown_to_html(text, "t"))
    assert [a.get("class") for a, _ in tree.find("td")] == [None, "num", "num", None, "num", None]


def test_md_table_without_rows_has_a_rule() -> None:
    lines = md_table(["a", "b"], []).splitlines()
    assert lines == ["| a | b |", "|---|---|"]


def test_write_report_atomic_and_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "rep"
    md_path, html_path = write_report(out, "r", "# One\n", "T")
    md_path, html_path = write_report(out, "r", "# Two\n", "T")
    assert sorted(p.name for p in out.iterdir()) == ["r.html", "r.md"]  # no temporaries left
    assert md_path.read_text() == "# Two\n"
    assert [t for _, t in _parse(html_path.read_text()).find("h1")] == ["Two"]


def test_sweep_reading_names_the_compute_bound() -> None:
    import pandas as pd

    from mer.analysis.sections.sweep import sweep_reading as _sweep_reading

    res = pd.DataFrame(
        {"tokens_per_s": [2.0, 1.9, 1.8, 1.7, 1.6, 0.5], "bound_compute_tokens_per_s": [2.1] * 6}
    )
    text = _sweep_reading(res)[0]
    assert "within 20.0%" in text  # (2.0 - 1.6) / 2.0
    assert "95% of the compute bound" in text and "expert FFN" in text
    io_bound = _sweep_reading(res.assign(bound_compute_tokens_per_s=4.0))[0]
    assert "50% of the compute bound" in io_bound and "I/O" in io_bound


def test_markdown_section_takes_its_title_and_keeps_blocks() -> None:
    from mer.analysis.sections import markdown_section

    sec = markdown_section(["## The face-off", "", "one line", "", "| a |", "|---|", "| 1 |"])
    assert sec.title == "The face-off"
    assert sec.blocks == ["one line", "| a |\n|---|\n| 1 |"]


def test_sections_are_ordered_and_keyed_once() -> None:
    from mer.analysis.sections import registered

    found = registered()
    keys = [k for _, k, _ in found]
    assert len(keys) == len(set(keys))
    assert [o for o, _, _ in found] == sorted(o for o, _, _ in found)
    for first, later in (("routing", "curves"), ("curves", "sweep"), ("sweep", "runs")):
        assert keys.index(first) < keys.index(later)


def test_curves_gap_table_shows_the_gap_closed_and_the_tuning_traces() -> None:
    """The report's curves section puts the LRU->OPT gap closed beside the hit rates and
    says which traces a tuned policy was fitted on (held out or in-sample)."""
    import pandas as pd

    from mer.analysis.sections import Section
    from mer.analysis.sections.curves import _gap_table

    hits = {"lru": (0.30, 0.50), "opt": (0.60, 0.80), "cycle": (0.45, 0.56)}
    rows = []
    for pol, rates in hits.items():
        for size, h in zip((64, 128), rates, strict=True):
            lru, opt = hits["lru"][size == 128], hits["opt"][size == 128]
            rows.append(
                {
                    "policy": pol,
                    "scope": "global",
                    "cache_slots": size,
                    "hit_rate": h,
                    "gap_closed": (h - lru) / (opt - lru),
                    "tuned_on": "a.parquet,b.parquet" if pol == "cycle" else "",
                    "held_out": True,
                }
            )
    sec = Section("curves")
    _gap_table(sec, pd.DataFrame(rows), [64, 128], ["opt", "cycle", "lru"])
    text = "\n".join(b for b in sec.blocks if isinstance(b, str))
    # (0.45 - 0.30) / (0.60 - 0.30) = 50%; (0.56 - 0.50) / (0.80 - 0.50) = 20%
    assert "| cycle | cold | 50 | 20 |" in text
    assert "| lru |" not in text and "| opt |" not in text
    assert "fitted on a.parquet,b.parquet: this trace is held out" in text
