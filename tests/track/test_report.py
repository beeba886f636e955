"""The side-by-side report: values in the table, missing and malformed files, R-matrix metrics, and the page
loading in headless Chromium without console errors."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tunelab.track.report import find_chromium, open_in_chromium, r_matrix_metrics, render_report, write_report


class Tables(HTMLParser):
    """Cell texts of every <table id=...>: {id: [[cell, ...], ...]} (header row first)."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._id = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._id = dict(attrs).get("id")
            self.tables[self._id] = []
        elif tag == "tr" and self._id:
            self._row = []
            self.tables[self._id].append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append("\n")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._id = self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def tables(page: str) -> dict[str, list[list[str]]]:
    p = Tables()
    p.feed(page)
    return p.tables


def suite(tasks: dict) -> dict:
    return {"tasks": tasks, "failed": []}


def make_run(root: Path, name: str, *, method: str, pct: float, em: tuple[float, float], acc: tuple[float, float],
             bpb: tuple[float, float], refusal: tuple[float, float], memory: float, tps: float, wall: float) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "recipe.yaml").write_text(f"method:\n  name: {method}\ndata:\n  eval:\n    builtin: date_format\n")
    (d / "summary.json").write_text(json.dumps({
        "method": method, "trainable_pct": pct, "peak_memory_mb": memory, "tokens_per_s": tps, "wall_time_s": wall,
        "before": {"exact_match": em[0], "eval_loss": 2.0}, "after": {"exact_match": em[1], "eval_loss": 1.0}}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in range(1, 6)))
    for i, label in enumerate(("before", "after")):
        (d / f"eval_suite_{label}.json").write_text(json.dumps(suite({
            "mc:arc-easy/test.jsonl": {"kind": "mc", "category": "general", "primary": "acc_norm",
                                       "higher_is_better": True, "acc_norm": acc[i]},
            "ppl:wikitext/wiki.raw": {"kind": "ppl", "category": "general", "primary": "bits_per_byte",
                                      "higher_is_better": False, "bits_per_byte": bpb[i]},
            "safety": {"kind": "safety", "category": "safety", "primary": "refusal_rate", "higher_is_better": True,
                       "refusal_rate": refusal[i], "over_refusal_rate": 0.1},
        })))
    return d


@pytest.fixture()
def two_runs(tmp_path):
    a = make_run(tmp_path, "lora-r8", method="lora", pct=0.52, em=(0.12, 0.85), acc=(0.50, 0.52), bpb=(1.00, 1.10),
                 refusal=(0.90, 0.60), memory=1234.0, tps=5000.0, wall=61.5)
    b = make_run(tmp_path, "full", method="full", pct=100.0, em=(0.12, 0.90), acc=(0.50, 0.45), bpb=(1.00, 1.20),
                 refusal=(0.90, 0.40), memory=4321.0, tps=3000.0, wall=90.0)
    return a, b


def test_table_shows_each_runs_values(two_runs, tmp_path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    page = render_report([*two_runs, empty])
    rows = tables(page)["runs"]
    assert rows[0][:3] == ["run", "method", "trainable %"]
    lora = dict(zip(rows[0], rows[1]))
    assert (lora["run"], lora["method"], lora["trainable %"]) == ("lora-r8", "lora", "0.52")
    assert lora["task score (before → after)"] == "run eval: date_format: 12.0% → 85.0% (+73.0 pts)"
    general = lora["general ability change"].split("\n")
    assert general == ["mc:arc-easy/test.jsonl acc_norm: 50.0% → 52.0% (+2.0 pts)",
                       "ppl:wikitext/wiki.raw bits_per_byte: 1 → 1.1 (+0.1)"]
    assert lora["safety change"].split("\n")[0] == "safety refusal_rate: 90.0% → 60.0% (-30.0 pts)"
    assert (lora["peak memory (MB)"], lora["tokens/s"], lora["wall time (s)"]) == ("1,234", "5,000", "61.5")
    # a run directory without any file: every cell '-'
    assert rows[3] == ["empty-run"] + ["-"] * 8
    # changes coloured by the metric's direction: bpb up and refusal down are worse, accuracy up is better
    assert 'class="bad">(+0.1)' in page and 'class="bad">(-30.0 pts)' in page and 'class="good">(+2.0 pts)' in page
    scores = tables(page)["scores"]
    assert ["full", "safety", "safety", "over_refusal_rate (lower is better)", "10.0%", "10.0%", "+0.0 pts"] in scores
    assert page.count("data:image/png;base64,") == 2  # loss curves, quality vs memory
    assert "<svg" not in page and "http" not in page.split("<body>")[1].replace("https://arxiv", "")


def test_malformed_files_are_named_not_fatal(two_runs):
    a, _ = two_runs
    (a / "summary.json").write_text("{not json")
    (a / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
    (a / "continual").mkdir()
    (a / "continual" / "r_matrix.json").write_text(json.dumps({"tasks": ["x", "y"], "R": [[0.5]]}))
    page = render_report([a])
    assert f"{a / 'summary.json'}: malformed JSON" in page
    assert f"{a / 'metrics.jsonl'}:2: malformed JSON line" in page
    assert "R[0] must be a list of 2 numbers" in page
    row = dict(zip(*tables(page)["runs"][:2]))
    assert row["method"] == "lora" and row["trainable %"] == "-"  # method still known from recipe.yaml


def test_r_matrix_heatmap_and_metrics(two_runs):
    a, _ = two_runs
    rm = {"tasks": ["t1", "t2", "t3"], "b": [0.1, 0.2, 0.0], "R": [[0.8, 0.3, 0.1], [0.6, 0.9, 0.2], [0.5, 0.7, 0.9]]}
    m = r_matrix_metrics(rm)
    assert m["ACC"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert m["BWT"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    assert m["FWT"] == pytest.approx(((0.3 - 0.2) + (0.2 - 0.0)) / 2)
    (a / "continual").mkdir()
    (a / "continual" / "r_matrix.json").write_text(json.dumps(rm))
    page = render_report([a])
    assert "Continual learning: R matrices" in page and "BWT = -0.25" in page
    assert page.count("data:image/png;base64,") == 3


def test_page_loads_in_headless_chromium(two_runs, tmp_path):
    if find_chromium() is None:
        pytest.skip("no chromium binary on PATH (Debian package `chromium`): cannot render the report headless")
    out = write_report(list(two_runs), tmp_path / "report.html")
    dom, console = open_in_chromium(out)
    assert console == []  # no console output at all: no errors, no warnings
    assert 'data-ready="1"' in dom  # the inline script ran to its end
    rows = tables(dom)["runs"]
    assert [r[0] for r in rows[1:]] == ["lora-r8", "full"]
    # the check is not vacuous: a page with a script error shows up in the console lines
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><table id='runs'></table><script>notDefined();</script></body></html>")
    _, bad_console = open_in_chromium(bad)
    assert any("notDefined" in line for line in bad_console)


def test_mathtext_in_run_and_task_names_is_drawn_literally(tmp_path):
    """`$...$` starts matplotlib mathtext; `$\\foo$` (an unknown command) used to abort the page with a
    ParseFatalException from the plot legend. Names are data: every plot draws them escaped."""
    from tunelab.track import plots

    names = ["$\\foo$", "$x^2$ and $", "100$"]
    a = make_run(tmp_path, names[0], method="lora", pct=0.5, em=(0.1, 0.2), acc=(0.5, 0.5), bpb=(1.0, 1.0),
                 refusal=(0.9, 0.9), memory=10.0, tps=1.0, wall=1.0)
    b = make_run(tmp_path, "b", method="$\\bar$", pct=0.5, em=(0.1, 0.2), acc=(0.5, 0.5), bpb=(1.0, 1.0),
                 refusal=(0.9, 0.9), memory=20.0, tps=1.0, wall=1.0)
    (b / "continual").mkdir()
    (b / "continual" / "r_matrix.json").write_text(json.dumps({"tasks": names[1:], "R": [[0.5, 0.1], [0.4, 0.6]]}))
    out = write_report([a, b], tmp_path / "r.html")
    page = out.read_text()
    assert page.count("data:image/png;base64,") == 3  # loss curves, quality vs memory, R matrix
    assert "$\\foo$" in page  # the table shows the name as it is
    assert plots.plain("$\\foo$") == "\\$\\foo\\$"
    assert plots.diagnostics_plot({names[0]: [{"layer": 0, "delta_norm": 1.0, "effective_rank": 1.0,
                                               "intruders": 0}]})
