"""report.html: one self-contained page from the report, checked as text and in a real browser
(headless Chromium: the DOM it builds holds the table and every figure with its title, and its
screenshot is not blank); the 80-column terminal table; `edgecompress report` and its one-line errors."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from edgecompress.cli import app
from edgecompress.devices import DeviceMetrics
from edgecompress.errors import ArtifactError
from edgecompress.measure import Metrics
from edgecompress.pipeline import compress
from edgecompress.recipe import Recipe
from edgecompress.report import Report, Row
from edgecompress.report.html import NoFigure, Section, figure, headline, layer_facts, to_html, write_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make toolchain "
                                                             "installs it)")
RUN_FIGURES = ["Bytes of each row's file, by what they hold", "accuracy against bytes (log scale), every row",
               "Speed-up against the baseline (ONNX Runtime, measured)", "Per layer: what each stage set",
               "Sensitivity scan of 1. prune (validation data)"]


@pytest.fixture(scope="module")
def run_report(task) -> Report:
    """A tiny real run: digits-lenet300, one prune stage allocated by a sensitivity scan, no fine-tune."""
    recipe = Recipe.from_dict({
        "task": "digits-lenet300", "seed": 0,
        "stages": [{"stage": "prune", "sparsity": 0.8, "scope": "sensitivity", "scan_ratios": [0.5, 0.8, 0.95]}],
        "constraints": {"max_metric_drop": 0.05}, "measure": {"latency": False}})
    return compress(task("digits-lenet300"), recipe).report


def metrics(stored: int, metric: float, breakdown: dict[str, int] | None = None, **kw) -> Metrics:
    return Metrics(params=1000, nonzero_params=kw.pop("nonzero", 1000), dense_bytes=4000, stored_bytes=stored,
                   artifact="ecz" if breakdown else "onnx", macs=kw.pop("macs", 1000), metric=metric,
                   metric_name="accuracy", breakdown=breakdown or {}, **kw)


def device(flash: int, ram: int) -> DeviceMetrics:
    return DeviceMetrics("cortex-m4", "c", "C library for cortex-m4", "int8", flash, ram, "static arena", 1000, 5000,
                         0.25, 1.5, "1,000 MACs x 4.0 cycles", {"fc1": flash // 2, "fc2": flash // 4},
                         {"fc1": 800, "fc2": 200}, "fc1 output", [])


def device_report() -> Report:
    """Three rows with latency, a device and a constraint missed: the columns and sections a run may add."""
    rows = [Row("baseline", "baseline", metrics(4200, 0.97, latency_ms={"b1": 0.2, "b64": 3.0}),
                device=device(600_000, 9000)),
            Row("prune 50% channels", "prune", metrics(2100, 0.965, latency_ms={"b1": 0.1, "b64": 1.4}, macs=500),
                {"fc1": "out 300 -> 150, in 784 -> 784"}, {"fc3": "excluded by the recipe"}, device=device(300_000, 5000)),
            Row("int8", "quantize", metrics(700, 0.96, latency_ms={"b1": 0.08, "b64": 1.0}, macs=500),
                {"fc1": "static: weight int8 sym per-channel(axis 0), input uint8 affine per-tensor"},
                notes=["QGemm x2 ran"], device=device(150_000, 4000))]
    return Report("toy", rows, {"max_metric_drop": 0.005, "max_flash": 200_000}, ["accuracy dropped 0.0100"])


class Page(HTMLParser):
    """What a page shows: figure captions with what stands in each, table header cells and rows."""

    def __init__(self, text: str):
        super().__init__()
        self.figures: dict[str, str] = {}  # caption -> "svg" | the message shown instead
        self.headers: list[str] = []
        self.cells: list[str] = []
        self._stack: list[str] = []
        self._caption: str | None = None
        self._text = ""
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self._stack.append(tag)
        cls = dict(attrs).get("class", "")
        if tag == "svg" and self._caption is not None and "figure" in self._stack:
            self.figures[self._caption] = "svg"
        if tag == "p" and cls == "nofig":
            self._text = ""
        if tag in ("figcaption", "th", "td"):
            self._text = ""

    def handle_endtag(self, tag):
        if tag == "figcaption":
            self._caption = self._text
            self.figures[self._caption] = ""
        elif tag == "p" and self._caption is not None and "figure" in self._stack and not self.figures[self._caption]:
            self.figures[self._caption] = self._text
        elif tag == "th":
            self.headers.append(self._text)
        elif tag == "td":
            self.cells.append(self._text)
        elif tag == "figure":
            self._caption = None
        while self._stack and self._stack.pop() != tag:
            pass

    def handle_data(self, data):
        self._text += data


def test_page_holds_the_headline_table_and_every_figure(run_report):
    r = run_report
    page = to_html(r)
    p = Page(page)
    text = html.unescape(page)
    assert list(p.figures) == RUN_FIGURES
    assert p.figures["Speed-up against the baseline (ONNX Runtime, measured)"] == (
        "Latency was not measured for this report (measure: {latency: false}).")
    assert all(p.figures[t] == "svg" for t in RUN_FIGURES if "Speed" not in t)
    q = r.ratios(r.final)
    assert f"{q['compression']:.1f}\u00d7 smaller" in text
    assert f"{r.final.stored_bytes:,}-byte .ecz file; the baseline's fp32 weights take {r.baseline.dense_bytes:,} bytes" in text
    assert f"{r.baseline.metric:.4f} \u2192 {r.final.metric:.4f} on held-out data (allowed drop 5 points)" in text
    head, rows = r.table()
    assert p.headers[:len(head)] == head
    assert p.cells[:len(head) * len(rows)] == [c for row in rows for c in row]
    # per layer: the sparsity each layer got, as the stage reported it
    for name, what in r.rows[1].touched.items():
        assert f"{100 * layer_facts(what)['sparsity']:.1f}% zeros" in text
        assert f"<b>{name}</b>: {what}" in text
    # self-contained: no scripts, no links, nothing fetched; small
    assert not re.search(r"<script|<link|<img|<iframe|@import|src=|href=\"(?!#)", page)
    assert set(re.findall(r"url\(([^)]*)\)", page)) <= {f"#{i}" for i in re.findall(r'id="([^"]+)"', page)}
    assert set(re.findall(r"https?://[^\"' ]+", page)) <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}
    assert len(page.encode()) < 300_000
    assert 'name="viewport"' in page and "@media print" in page


def test_device_constraints_and_latency_are_shown_with_their_labels():
    r = device_report()
    page = html.unescape(to_html(r))
    p = Page(page)
    assert p.figures["Flash and RAM on cortex-m4"] == "svg"
    assert p.figures["Speed-up against the baseline (ONNX Runtime, measured)"] == "svg"
    assert p.figures["Per layer: what each stage set"] == "svg"  # bits, as no stage set a sparsity
    assert "Constraints missed" in page and "accuracy dropped 0.0100" in page
    assert "latency ms (estimate)" in page and "energy \u00b5J (estimate)" in page
    assert "150,000 (14% of cortex-m4)" in page and "4,000 (2%)" in page
    assert "Constraints: max_flash 200,000." in page
    assert "does not fit cortex-m4" not in page and "fits cortex-m4" in page
    assert "fc3</b>: skipped: excluded by the recipe" in page
    assert "<b>8 bits (static int8)</b>" in page and "<b>out 300\u2192150, in 784\u2192784</b>" in page
    assert "75,000 B of weights on cortex-m4" in page
    assert "5.7\u00d7 smaller" in page and "2.50\u00d7 as fast" in page


def test_a_figure_that_cannot_be_drawn_leaves_a_message():
    one = Report("toy", [Row("baseline", "baseline", metrics(4200, 0.97))])
    p = Page(to_html(one))
    assert p.figures["accuracy against bytes (log scale), every row"] == (
        "Needs at least 2 rows to compare; this report has 1.")
    assert p.figures["Bytes of each row's file, by what they hold"] == "svg"
    assert p.figures["Per layer: what each stage set"] == "No stage reported a sparsity, bit width or rank per layer."

    def broken(fig):
        raise ZeroDivisionError("division by zero")
    assert figure("Broken", broken).endswith(
        '<p class="nofig">This figure could not be drawn: ZeroDivisionError: division by zero</p></figure>')


def test_headline_says_what_was_lost_in_words():
    def lost(after: float) -> str:
        r = Report("toy", [Row("baseline", "baseline", metrics(4000, 0.97)), Row("x", "prune", metrics(400, after))])
        return re.search(r'What was lost</div><div class="big">([^<]*)<', headline(r)).group(1)
    assert lost(0.9650) == "\u22120.50 points of accuracy"
    assert lost(0.97) == "no accuracy lost"
    assert lost(0.9750) == "nothing: +0.50 points of accuracy"


def test_extra_sections_are_added_after_the_built_in_ones():
    def front(fig, points):
        if not points:
            raise NoFigure("No trial finished.")
        fig.add_subplot(1, 1, 1).plot(*zip(*points))
    extra = [Section("Pareto front", figure("Pareto front: accuracy against bytes", front, [(1, 2), (2, 3)])),
             Section("Trials over time", figure("Trials", front, []), id="trials")]
    page = to_html(device_report(), sections=extra)
    p = Page(page)
    assert p.figures["Pareto front: accuracy against bytes"] == "svg" and p.figures["Trials"] == "No trial finished."
    assert '<a href="#pareto-front">Pareto front</a><a href="#trials">Trials over time</a>' in page
    assert page.index('id="device"') < page.index('id="pareto-front"') < page.index('id="notes"')


def test_layer_facts_read_what_each_technique_reports():
    assert layer_facts("sparsity 0.9414") == {"sparsity": 0.9414}
    assert layer_facts("sparsity 0.5000 (2:4 pattern)") == {"sparsity": 0.5}
    assert layer_facts("16 shared values (4 bits) for 13,772 nonzero weights; bias 32 shared values (5 bits)") == {
        "bits": 4, "format": "16 shared values"}
    assert layer_facts("weight_only: weight int4 sym per-group(32), GPTQ rounding") == {"bits": 4, "format": "weight_only int4"}
    assert layer_facts("dynamic: weight float16") == {"bits": 16, "format": "dynamic float16"}
    assert layer_facts("svd rank 12 (energy 0.9000): weights 1,000 -> 500, MACs 1,000 -> 500") == {
        "rank": "12", "format": "svd"}
    assert layer_facts("out 6 -> 3, in 1 -> 1") == {"format": "out 6\u21923, in 1\u21921"}
    assert layer_facts("replaced by identity (calibration loss +0.0100 alone)") == {}


@pytest.mark.parametrize("width", [80, 60, 120])
def test_terminal_table_fits_the_width_and_cuts_no_word(run_report, width):
    for r in (run_report, device_report()):
        c = Console(width=width, record=True)
        c.print(r.to_rich(width))
        text = c.export_text()
        assert max(len(line) for line in text.splitlines()) <= width
        head, rows = r.table()
        words = set(re.findall(r"[^\s│┃]+", text))
        for cell in [*head, *(c for row in rows for c in row)]:
            assert set(cell.split()) <= words, cell


def test_report_json_round_trips_and_other_schema_versions_are_refused(run_report, tmp_path):
    d = json.loads(run_report.to_json())
    assert d["schema_version"] == 1
    assert list(d) == ["schema_version", "task", "constraints", "violations", "rows"]
    assert Report.from_dict(d).to_dict() == d
    assert Report.from_dict(json.loads(device_report().to_json())).to_dict() == device_report().to_dict()
    with pytest.raises(ArtifactError) as e:
        Report.from_dict({**d, "schema_version": 2}, "out/report.json")
    assert str(e.value) == "out/report.json: schema_version must be 1; got 2"
    with pytest.raises(ArtifactError) as e:
        Report.from_dict({k: v for k, v in d.items() if k != "rows"}, "r.json")
    assert str(e.value) == "r.json: not an edgecompress report (KeyError: 'rows')"


def test_report_command_renders_again_and_bad_input_is_one_line(run_report, tmp_path):
    runner = CliRunner()
    (tmp_path / "report.json").write_text(run_report.to_json())
    r = runner.invoke(app, ["report", str(tmp_path)], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    assert (tmp_path / "report.html").read_text(encoding="utf-8") == to_html(run_report, folder=tmp_path)
    assert f"wrote {tmp_path / 'report.html'}" in r.output
    assert max(len(line) for line in r.output.splitlines() if "│" in line) <= 80
    cases = {
        str(tmp_path / "empty"): f"error: {tmp_path / 'empty'}: no report.json in this folder (edgecompress run writes one)",
        str(tmp_path / "v2.json"): f"error: {tmp_path / 'v2.json'}: schema_version must be 1; got 2",
        str(tmp_path / "old.json"): f"error: {tmp_path / 'old.json'}: schema_version must be 1; got None",
        str(tmp_path / "bad.json"): f"error: {tmp_path / 'bad.json'}: not a report.json (Expecting value: line 1 column 1 (char 0))",
        str(tmp_path / "nope.json"): f"error: {tmp_path / 'nope.json'}: no such file",
    }
    (tmp_path / "empty").mkdir()
    (tmp_path / "v2.json").write_text(json.dumps({**json.loads(run_report.to_json()), "schema_version": 2}))
    (tmp_path / "old.json").write_text(json.dumps({"task": "x", "rows": []}))
    (tmp_path / "bad.json").write_text("not json")
    for arg, message in cases.items():
        r = runner.invoke(app, ["report", arg], env={"COLUMNS": "200"})
        assert r.exit_code == 2 and r.output.strip() == message, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "empty", "old.json", "report.html",
                                                          "report.json", "v2.json"]


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(dir=tmp_path, prefix="chromium-")
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)


def distinct_colours(png: Path) -> int:
    import numpy as np
    from matplotlib.image import imread

    pixels = imread(str(png))
    return len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0))


@needs_chromium
def test_chromium_renders_the_table_and_every_figure(run_report, tmp_path):
    def nothing(fig):
        raise NoFigure("Nothing to draw.")
    page = write_html(run_report, tmp_path / "report.html", sections=[Section("More", figure("One row", nothing))])
    dom = chromium(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    p = Page(dom.stdout)
    head, rows = run_report.table()
    assert p.headers[:len(head)] == head
    assert p.cells[:len(head) * len(rows)] == [c for row in rows for c in row]
    assert [t for t in RUN_FIGURES if p.figures.get(t) == "svg"] == [t for t in RUN_FIGURES if "Speed" not in t]
    assert p.figures["One row"] == "Nothing to draw."
    shot = tmp_path / "shot.png"
    r = chromium(tmp_path, f"--screenshot={shot}", "--window-size=390,1400", page.as_uri())
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    assert distinct_colours(shot) > 100  # text, the headline bar and the plots, not a blank page


def test_a_row_measured_slower_than_the_baseline_says_so():
    report = device_report()
    slow = Row("int8 thin", "quantize", metrics(700, 0.96, latency_ms={"b1": 0.25, "b64": 2.0}))
    report.rows.append(slow)
    lines = report.layer_lines()
    assert "int8 thin: measured slower than the baseline at b1 (0.250 ms against 0.200)" in lines
    assert not any("slower than the baseline" in line for line in lines if not line.startswith("int8 thin"))
