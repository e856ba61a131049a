"""The HTML report: rendering every document element, escaping, gaps, atomic writes, `mergelab report`, converters."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

import mergelab.report.html as html_mod
from mergelab.cli import main
from mergelab.errors import SpecError
from mergelab.experiments.comparison_table import ComparisonTable, MethodRow
from mergelab.experiments.paper_results import PAPER_TABLE3
from mergelab.experiments.pool_scaling import PoolScalingResult
from mergelab.report import Figure, ReportDocument, Section, Series, Table, Verdict
from mergelab.analysis.statistics import holm, mcnemar_exact
from mergelab.evaluation.outcomes import pack_outcomes
from mergelab.report.convert import (
    comparison_document,
    comparison_verdicts,
    merge_pool_scaling_documents,
    pool_scaling_document,
    pool_scaling_verdicts,
)
from mergelab.report.html import EM_DASH, format_cell, render_html, verdict_counts, write_html
from mergelab.report.text import pool_scaling_text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def full_document(title: str = "Study <one> & \"two\"") -> ReportDocument:
    """A document using every element: line (log axes, error bars, gaps, styles), bar, empty and categorical
    figures, a table with every kind of cell, all three verdict outcomes."""
    return ReportDocument(
        title=title, study="unit", summary="First <b>paragraph</b>.\n\nSecond & last.",
        config={"grid": {"lr": [0.01, 0.1]}, "note": "<script>alert(1)</script>"},
        sections=[
            Section(title="Curves <1>", text="Some text.", figures=[
                Figure(id="curve", title="Loss vs K <log>", xlabel="K", ylabel="loss", xscale="log", yscale="log",
                       series=[Series(label="measured", x=[1, 10, 100, 1000], y=[1.0, None, 0.3, float("nan")],
                                      yerr=[0.1, None, 0.05, None]),
                               Series(label="bound", x=[1, 10, 100, 1000], y=[2.0, 1.0, 0.5, 0.25], style="dashed"),
                               Series(label="paper", x=[1, 1000], y=[0.9, 0.2], style="points")]),
                Figure(id="bars", title="Accuracy per method", kind="bar",
                       series=[Series(label="avg", x=["ta", "ties", "fw"], y=[50.0, None, 70.0], yerr=[1.0, 2.0, None]),
                               Series(label="norm", x=["ta", "ties", "fw"], y=[55.0, 60.0, float("inf")])]),
            ], tables=[Table(title="Numbers & <things>", columns=["name", "value", "count", "flag", "missing"],
                             rows=[["a<b", 1.23456, 3, True, None], ["c", float("nan"), 0, False, {"k": 1}]],
                             digits=2, caption="cap <i>")]),
            Section(title="Edge figures", figures=[
                Figure(id="empty", title="Nothing measured", series=[Series(label="none", x=[1, 2], y=[None, None])]),
                Figure(id="cat-line", title="Categorical line", yscale="log",
                       series=[Series(label="s", x=["small", "large"], y=[1.0, -1.0])]),
            ], verdicts=[
                Verdict(claim="Loss falls with K", predicted="falls", measured="falls", agrees=True),
                Verdict(claim="Bound <ranks> pools", predicted="rho > 0", measured="rho = -0.1", agrees=False,
                        detail="16 pools"),
                Verdict(claim="Critical point", predicted="a middle eta", measured="too few points", agrees=None),
            ]),
        ],
        created="2025-01-01T00:00:00+00:00", versions={"mergelab": "9.9", "torch": "x"},
    )


def small_document(title: str = "Small") -> ReportDocument:
    """One figure, one table, one verdict: for the CLI tests (drawing figures is the slow part)."""
    return ReportDocument(title=title, study="small", sections=[Section(
        title="Only", figures=[Figure(id="f", title="f", series=[Series(label="s", x=[1, 2], y=[1.0, 2.0])])],
        tables=[Table(title="t", columns=["a"], rows=[[1.0]])],
        verdicts=[Verdict(claim="c", predicted="p", measured="m", agrees=True)])])


@pytest.fixture(scope="module")
def page() -> str:
    return render_html(full_document())


def _imgs(page: str) -> list[str]:
    return re.findall(r"<img [^>]*>", page)


def test_page_has_every_figure_table_verdict_and_is_self_contained(tmp_path):
    doc = full_document()
    path = write_html(doc, tmp_path / "r.html")
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    imgs = _imgs(page)
    assert len(imgs) == len(doc.figures()) == 4
    for fig, img in zip(doc.figures(), imgs):
        assert f'alt="{fig.title.replace("<", "&lt;").replace(">", "&gt;")}"' in img
        data = re.search(r'src="data:image/png;base64,([^"]+)"', img).group(1)
        png = base64.b64decode(data)
        assert png.startswith(PNG_MAGIC) and len(png) > 2000
    # 1 data table + 1 verdict table; expectations recorded on <body> for the browser test
    assert page.count("<table") == 2
    assert 'data-figures="4"' in page and 'data-tables-expected="2"' in page
    assert page.count('data-verdict="agree"') == 1 and page.count('data-verdict="disagree"') == 1
    assert page.count('data-verdict="undecided"') == 1
    assert "\u2713 agrees" in page and "\u2717 disagrees" in page and "? undecided" in page
    assert verdict_counts(doc) == {"agree": 1, "disagree": 1, "undecided": 1}
    # table of contents links every section and the configuration
    for anchor in ("#s0", "#s1", "#config"):
        assert f'href="{anchor}"' in page
    assert 'id="s0"' in page and 'id="s1"' in page and 'id="config"' in page
    # config as pretty JSON, footer with versions and creation time
    assert "&quot;grid&quot;: {" in page and "mergelab 9.9" in page and "2025-01-01T00:00:00+00:00" in page
    # nothing external: no http(s) URL, no external script or stylesheet
    assert not re.search(r"""(src|href)=["']https?:""", page)
    assert "<link" not in page


def test_text_is_escaped(page):
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Study &lt;one&gt; &amp; &quot;two&quot;" in page
    assert "<b>paragraph</b>" not in page and "First &lt;b&gt;paragraph&lt;/b&gt;." in page
    assert "a&lt;b" in page and "Bound &lt;ranks&gt; pools" in page and "cap &lt;i&gt;" in page
    # exactly one <script>: the page's own
    assert page.count("<script>") == 1


def test_table_cells_format_numbers_and_missing_values(page):
    assert format_cell(1.23456, 2) == "1.23"
    assert format_cell(3, 2) == "3"
    assert format_cell(None) == EM_DASH and format_cell(math.nan) == EM_DASH and format_cell(math.inf) == EM_DASH
    assert format_cell(True) == "yes" and format_cell(False) == "no"
    assert format_cell({"b": 1, "a": 2}) == '{"a": 2, "b": 1}'
    row = re.findall(r"<tr><td>a&lt;b</td>(.*?)</tr>", page)[0]
    assert ">1.23<" in row and ">3<" in row and ">yes<" in row and f">{EM_DASH}<" in row
    row2 = re.findall(r"<tr><td>c</td>(.*?)</tr>", page)[0]
    assert f">{EM_DASH}<" in row2  # the NaN value


def test_gaps_and_degenerate_figures_draw(tmp_path):
    # the full document's figures (log axes, gaps, NaN/Inf, all-missing series) drew in test_page_has_every...
    single = Figure(id="one", title="one point", series=[Series(label="", x=[5], y=[1.0], yerr=[None])])
    assert html_mod.figure_png(single).startswith(PNG_MAGIC)
    bars = Figure(id="b", title="empty bars", kind="bar", yscale="log",
                  series=[Series(label="x", x=["a"], y=[0.0]), Series(label="y", x=["a"], y=[None])])
    assert html_mod.figure_png(bars).startswith(PNG_MAGIC)


def test_combined_page_prefixes_ids(tmp_path):
    a, b = small_document("A"), small_document("B")  # same figure ids in both
    page = write_html([a, b], tmp_path / "both.html", title="Both").read_text()
    assert len(_imgs(page)) == 2 and page.count("<table") == 4
    assert 'id="d0-fig-f"' in page and 'id="d1-fig-f"' in page
    assert 'href="#d0-top"' in page and 'href="#d1-s0"' in page
    assert "<title>Both</title>" in page


def test_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "r.html"
    target.write_text("previous")

    def broken(fig, dpi=100):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(html_mod, "figure_png", broken)
    with pytest.raises(RuntimeError, match="drawing failed"):
        write_html(full_document(), target)
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]
    with pytest.raises(RuntimeError):
        write_html(full_document(), tmp_path / "new.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]
    # a failure while writing leaves nothing either
    monkeypatch.undo()

    def bad_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(html_mod.os, "replace", bad_replace)
    with pytest.raises(OSError, match="disk full"):
        write_html(small_document(), tmp_path / "new.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]


def test_write_into_folder_and_bad_input(tmp_path):
    assert write_html(small_document(), tmp_path) == tmp_path / "report.html"
    with pytest.raises(SpecError, match="no report document"):
        render_html([])
    with pytest.raises(SpecError, match="ReportDocument"):
        render_html([{"title": "x"}])  # type: ignore[list-item]


# --------------------------------------------------------------------------------------------- CLI


def test_cli_report_one_and_several(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    small_document("A").to_json(a)
    small_document("B").to_json(b)
    assert main(["report", str(a)]) == 0
    assert capsys.readouterr().out.strip() == str(a / "report.html")
    assert (a / "report.html").is_file()
    out = tmp_path / "combined.html"
    assert main(["report", str(a), str(b / "report.json"), "--out", str(out)]) == 0
    page = out.read_text()
    assert len(_imgs(page)) == 2 and ">A</a>" in page and ">B</a>" in page
    assert main(["report", str(a), str(b), "--separate"]) == 0
    assert (b / "report.html").is_file()


def test_cli_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert "no such study folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 1
    assert "no report document here" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "report.json").write_text(json.dumps({"title": "t", "study": "s", "sections": [{"title": 1, "bogus": 2}]}))
    good = tmp_path / "good"
    good.mkdir()
    small_document().to_json(good)
    assert main(["report", str(good), str(bad), "--out", str(tmp_path / "x.html")]) == 1
    err = capsys.readouterr().err
    assert "invalid report document" in err and "bogus" in err
    assert not (tmp_path / "x.html").exists()  # nothing written when one document is bad
    (bad / "report.json").write_text("{not json")
    assert main(["report", str(bad)]) == 1
    assert "cannot read the report document" in capsys.readouterr().err
    (bad / "report.json").write_text('{"title": ' + "[" * 100_000 + "]" * 100_000 + "}")  # issue 12
    assert main(["report", str(bad)]) == 1
    assert f"{bad / 'report.json'}: cannot read the report document: nested more than 100 levels deep" in capsys.readouterr().err
    assert main(["report", str(good), "--out", str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ converters


N_TEST = 200


def _row(method: str, avg: float, error: str | None = None, offset: int = 0, outcomes: bool = True) -> MethodRow:
    """A row with accuracy ``avg`` on both tasks: right on examples ``offset .. offset + avg * N_TEST`` of each."""
    nan = math.nan
    if error:
        return MethodRow(method, {}, {}, nan, nan, nan, nan, {}, nan, error)
    right = np.zeros(N_TEST, dtype=bool)
    right[offset:offset + round(avg * N_TEST)] = True
    packed = {t: pack_outcomes(right) for t in ("t1", "t2")} if outcomes else {}
    return MethodRow(method, {"t1": avg, "t2": avg}, {"t1": 1.0, "t2": 1.0}, avg, avg / 0.9, 1.5, 300.0,
                     {"method": method, "lambda": 0.3}, 200.0, per_task_correct=packed,
                     per_task_n={"t1": N_TEST, "t2": N_TEST})


def _table() -> ComparisonTable:
    # dare: 62% against task arithmetic's 60%, but right on 14 examples per task TA misses and wrong on 10 it gets
    rows = [_row("pretrained", 0.3), _row("individual", 0.9), _row("task_arithmetic", 0.6), _row("ties", 0.7),
            _row("dare", 0.62, offset=10), _row("adamerging", 0.5), _row("fw_soft", math.nan, error="SpecError: boom")]
    return ComparisonTable("resnet_s", ["t1", "t2"], rows, {"sources": {"ties": "Yadav"}, "wall_note": "w"})


def test_comparison_converter(tmp_path):
    table = _table()
    doc = comparison_document(table)
    assert doc.study == "comparison" and doc.config["tasks"] == ["t1", "t2"]
    assert [f.id for f in doc.figures()] == ["compare-accuracy", "compare-per-task", "compare-wall"]
    acc = doc.figures()[0]
    assert acc.kind == "bar" and [s.label for s in acc.series] == ["average accuracy", "normalized accuracy"]
    assert "fw_soft" not in acc.series[0].x  # failed rows have no bar
    assert acc.series[0].y[acc.series[0].x.index("ties")] == pytest.approx(70.0)
    main_table = doc.sections[0].tables[0]
    failed = next(r for r in main_table.rows if r[0] == "fw_soft")
    assert failed[-1] == "SpecError: boom" and failed[1] is None
    verdicts = {v.claim: v for v in comparison_verdicts(table)}
    assert verdicts["TIES beats task arithmetic"].agrees is True  # 40 examples only TIES gets, none the other way
    assert verdicts["DARE beats task arithmetic"].agrees is None  # 28 vs 20 discordant examples: not significant
    dare = table.paired_test("dare", "task_arithmetic")
    assert (dare.a_only, dare.b_only) == (28, 20) and dare.p_value == pytest.approx(mcnemar_exact(28, 20))
    assert dare.p_value > 0.3 and "p = 0.312" in verdicts["DARE beats task arithmetic"].measured
    assert verdicts["AdaMerging beats task arithmetic"].agrees is False
    assert verdicts["FW-soft beats task arithmetic"].agrees is None  # failed row
    # Holm over the table's 7 paired comparisons (4 merges vs pretrained, 3 vs task arithmetic; fw_soft failed),
    # discordant counts by construction (200 examples per task, 2 tasks)
    hand = {("task_arithmetic", "pretrained"): (120, 0), ("ties", "pretrained"): (160, 0),
            ("dare", "pretrained"): (148, 20), ("adamerging", "pretrained"): (80, 0),
            ("ties", "task_arithmetic"): (40, 0), ("dare", "task_arithmetic"): (28, 20),
            ("adamerging", "task_arithmetic"): (0, 40)}
    comps = table.paired_comparisons()
    assert [(c.method, c.reference) for c in comps] == list(hand) and all(c.family == 7 for c in comps)
    assert [(c.test.a_only, c.test.b_only) for c in comps] == list(hand.values())
    adjusted = holm([mcnemar_exact(*bc) for bc in hand.values()])
    assert [c.p_adjusted for c in comps] == pytest.approx(adjusted)
    ties = table.paired_test("ties", "task_arithmetic")
    assert ties.p_value == pytest.approx(2 * 0.5 ** 40)
    # ties and adamerging vs TA share the 5th/6th smallest p = 2^-39: both adjusted to 3 * 2^-39; dare vs TA is the
    # largest, adjusted by 1 (its own p)
    assert adjusted[4] == pytest.approx(3 * ties.p_value) and adjusted[6] == pytest.approx(3 * ties.p_value)
    assert adjusted[5] == pytest.approx(mcnemar_exact(28, 20))
    assert f"Holm-adjusted p = {3 * ties.p_value:.3g}" in verdicts["TIES beats task arithmetic"].measured
    paired = doc.sections[0].tables[1]
    assert paired.title.startswith("Paired tests") and len(paired.rows) == 7
    dare_row = next(r for r in paired.rows if r[:2] == ["dare", "task_arithmetic"])
    assert dare_row[2] == pytest.approx(100 * (0.62 - 0.6)) and dare_row[-1] == "undecided"
    assert dare_row[3] < 0 < dare_row[4] and dare_row[-2] == f"{adjusted[5]:.3g}"
    assert "summary" and "Best merge by average accuracy: ties" in doc.summary and "Failed: fw_soft" in doc.summary
    # round trip through report.json and the HTML page
    path = doc.to_json(tmp_path)
    again = ReportDocument.from_json(path)
    assert again == doc
    page = write_html(again, tmp_path).read_text()
    assert len(_imgs(page)) == 3


def test_a_ranking_without_per_example_results_is_undecided():
    rows = [_row("task_arithmetic", 0.6, outcomes=False), _row("ties", 0.9, outcomes=False)]
    (v,) = comparison_verdicts(ComparisonTable("resnet_s", ["t1", "t2"], rows))
    assert v.agrees is None and "no per-example results" in v.measured


def test_comparison_table_keeps_outcomes_through_json():
    table = _table()
    again = ComparisonTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert np.array_equal(again.row("ties").outcomes()["t1"], table.row("ties").outcomes()["t1"])
    assert again.row("ties").outcomes()["t1"].sum() == 140


def _pool_result(mode: str, ta: list[float], fw: list[float]) -> PoolScalingResult:
    sizes = [4, 8, 12]
    tables = {}
    for i, n in enumerate(sizes):
        tables[n] = ComparisonTable("resnet_s", ["t1", "t2"], [_row("task_arithmetic", ta[i]), _row("fw_soft", fw[i])])
    pools = {n: [f"t{k}" for k in range(n)] for n in sizes}
    return PoolScalingResult(mode, "resnet_s", sizes, ["task_arithmetic", "fw_soft"], pools,
                             {n: ["t1", "t2"] for n in sizes}, tables, {"seed": 0})


def test_pool_scaling_converter_and_verdicts(tmp_path):
    irr = _pool_result("irrelevant", [0.7, 0.5, 0.3], [0.74, 0.75, 0.735])
    doc = pool_scaling_document(irr)
    fig = doc.figures()[0]
    assert fig.kind == "line" and fig.series[0].x == [4, 8, 12]
    paper = [s for s in fig.series if s.label.startswith("paper:")]
    assert {s.label for s in paper} == {f"paper: {m}" for m in PAPER_TABLE3["irrelevant"]}
    assert all(s.style == "points" for s in paper)
    assert paper[0].y == [PAPER_TABLE3["irrelevant"]["task_arithmetic"][n] for n in (4, 20)]
    verdicts = {v.claim: v.agrees for v in pool_scaling_verdicts(irr)}
    assert verdicts == {"Task arithmetic falls as irrelevant experts join": True,
                        "FW-soft stays flat as irrelevant experts join": True}
    text = pool_scaling_text(irr)
    assert "[yes] Task arithmetic falls as irrelevant experts join: 70.0% (4 experts) -> 30.0% (12 experts)" in text
    # same examples at both sizes: paired, 160 examples only the smallest pool's TA gets right, none the other way
    assert f"McNemar exact p = {2 * 0.5 ** 160:.3g}" in text
    falls = _pool_result("irrelevant", [0.7, 0.7, 0.71], [0.74, 0.6, 0.5])
    assert {v.claim: v.agrees for v in pool_scaling_verdicts(falls)} == {
        "Task arithmetic falls as irrelevant experts join": False, "FW-soft stays flat as irrelevant experts join": False}
    rel = _pool_result("relevant", [0.6, 0.5, 0.4], [0.6, 0.65, 0.7])
    assert [(v.claim, v.agrees) for v in pool_scaling_verdicts(rel)] == [("FW-soft improves as relevant experts join", True)]
    # both modes in one folder's report.json
    both = merge_pool_scaling_documents(doc, pool_scaling_document(rel))
    assert set(both.config) == {"irrelevant", "relevant"} and len(both.sections) == 2
    again = merge_pool_scaling_documents(both, pool_scaling_document(_pool_result("relevant", [0.6] * 3, [0.6] * 3)))
    assert len(again.sections) == 2
    page = write_html(both, tmp_path).read_text()
    assert len(_imgs(page)) == 4 and page.count('data-verdict="agree"') == 3


def test_pool_scaling_over_different_evaluated_tasks_is_tested_as_independent_samples():
    rel = _pool_result("relevant", [0.6, 0.5, 0.4], [0.6, 0.65, 0.7])
    wide = rel.tables[12].row("fw_soft")
    right = np.zeros(N_TEST, dtype=bool)
    right[:140] = True
    wide.per_task["t3"], wide.per_task_correct["t3"], wide.per_task_n["t3"] = 0.7, pack_outcomes(right), N_TEST
    rel.eval_tasks[12] = ["t1", "t2", "t3"]
    (v,) = pool_scaling_verdicts(rel)
    # 60% on 2 x 200 examples -> 70% on 3 x 200: +10 points, se^2 = .6*.4/199/2 + .7*.3/199/3
    se = math.sqrt(0.6 * 0.4 / 199 / 2 + 0.7 * 0.3 / 199 / 3)
    assert v.agrees is True and "independent samples" in v.measured
    assert f"95% CI {100 * (0.1 - 1.959964 * se):+.1f} to {100 * (0.1 + 1.959964 * se):+.1f}" in v.measured


def test_compare_cli_writes_report_json(tmp_path, monkeypatch, capsys):
    import mergelab.experiments.compare as compare_mod

    monkeypatch.setattr(compare_mod, "run_comparison", lambda *a, **k: _table())
    assert main(["compare", "--out", str(tmp_path), "--no-progress"]) == 1  # a failed row -> exit 1
    assert "mergelab report" in capsys.readouterr().out
    doc = ReportDocument.from_json(tmp_path)
    assert doc.study == "comparison"
    assert main(["report", str(tmp_path)]) == 0
    assert Path(tmp_path / "report.html").is_file()


def test_pool_scaling_cli_writes_one_report_for_both_modes(tmp_path, monkeypatch, capsys):
    import mergelab.experiments.pool_scaling as pool_mod

    results = {"irrelevant": _pool_result("irrelevant", [0.7, 0.5, 0.3], [0.74, 0.75, 0.735]),
               "relevant": _pool_result("relevant", [0.6, 0.5, 0.4], [0.6, 0.65, 0.7])}
    monkeypatch.setattr(pool_mod, "run_pool_scaling", lambda mode, *a, **k: results[mode])
    for mode in ("irrelevant", "relevant", "relevant"):
        assert main(["compare", "--pool-scaling", mode, "--out", str(tmp_path), "--no-progress"]) == 0
    assert "mergelab report" in capsys.readouterr().out
    doc = ReportDocument.from_json(tmp_path)
    assert doc.study == "pool_scaling" and set(doc.config) == {"irrelevant", "relevant"}
    assert len(doc.sections) == 2 and len(doc.verdicts()) == 3


# ------------------------------------------------------------------------------------- user text in figures


def _dollar_figures() -> list[Figure]:
    names = ["cost $5 vs $10", "$x^$"]  # drawn as math, and a math-text syntax error (issue 12)
    return [
        Figure(id="bars", title="cost $5 vs $10", xlabel="cost $5 vs $10", ylabel="$x^$", kind="bar",
               series=[Series(label=n, x=names, y=[1.0, 2.0]) for n in names]),
        Figure(id="lines", title="$x^$", xlabel="$x^$", ylabel="cost $5 vs $10", yscale="log",
               series=[Series(label=n, x=names, y=[0.1, 10.0]) for n in names]),
    ]


def test_dollar_signs_in_figure_text_do_not_crash_the_report(tmp_path):
    doc = ReportDocument(title="t", study="s", sections=[Section(title="s", figures=_dollar_figures())])
    for fig in doc.figures():
        assert html_mod.figure_png(fig).startswith(PNG_MAGIC)
    page = write_html(doc, tmp_path / "r.html").read_text()
    assert page.count('alt="$x^$"') == 1 and page.count('alt="cost $5 vs $10"') == 1


def test_user_text_in_figures_is_text_not_math():
    import io

    from matplotlib.cbook import is_math_text
    from matplotlib.text import Text

    for fig in _dollar_figures():
        drawn = html_mod.draw_figure(fig)
        drawn.savefig(io.BytesIO(), format="png")  # creates the tick labels
        texts = [t.get_text() for t in drawn.findobj(Text) if t.get_visible() and t.get_text()]
        user = [t for t in texts if "$x^" in t or "cost" in t]
        # matplotlib draws a text literally when it has no unescaped pair of "$" and shows "\$" as "$"
        assert user and not any(is_math_text(t) for t in user), user
        shown = {t.replace("\\$", "$") for t in user}
        assert {"cost $5 vs $10", "$x^$"} <= shown
        if fig.yscale == "log":  # matplotlib's own math (log tick labels such as 10^1) is still math
            assert any(is_math_text(t) and "10^" in t for t in texts if t not in user)
