"""``mergelab analyze`` and the report object: files written, extension by sections, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergelab.analysis import DiagnosticsConfig, Drawing, Report, pool_diagnostics, write_report
from mergelab.analysis.diagnostics_report import diagnostics_report, short_labels
from mergelab.report import ReportDocument
from mergelab.report.markdown import fmt, markdown_table
from mergelab.checkpoints import save_state_dict
from mergelab.cli import main


def keyed(doc: dict) -> dict:
    """The sections of a ``report.json`` by key."""
    return {s["key"]: s for s in doc["sections"]}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write_pool(root: Path, n_exp: int = 3) -> tuple[Path, list[Path]]:
    g = torch.Generator().manual_seed(0)
    base = {
        "enc.weight": torch.randn(16, 8, generator=g),
        "enc.bias": torch.randn(16, generator=g),
        "head.weight": torch.randn(4, 16, generator=g),
        "bn.num_batches_tracked": torch.tensor(5),
    }
    save_state_dict(base, root / "base.safetensors")
    paths = []
    for i in range(n_exp):
        folder = root / f"expert{i}"
        folder.mkdir()
        e = {k: (v + 0.1 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v for k, v in base.items()}
        paths.append(save_state_dict(e, folder / "model.safetensors"))
    return root / "base.safetensors", paths


def _spec(root: Path, text: str) -> Path:
    path = root / "spec.yaml"
    path.write_text(text)
    return path


SPEC = """\
method: ties
base: base.safetensors
models:
  - path: expert0
  - path: expert1
    weight: 2.0
  - path: expert2
parameters:
  density: 0.3
  trim_scope: tensor
data:                 # for the data-dependent analyses: accepted and set aside here
  task: digits
  samples: 100
analysis:
  barrier: true
"""


def test_cli_writes_report_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_pool(tmp_path)
    spec = _spec(tmp_path, SPEC)
    out = tmp_path / "report"
    assert main(["analyze", str(spec), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "sign conflict" in printed and "expected ranking (heuristic" in printed
    assert "density 0.3 from the spec" in printed
    for name in ("report.json", "report.md", "layers.csv", "cosine.png", "conflicts.png", "dispersion.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "report.json").read_text())
    assert list(keyed(data)) == ["diagnostics", "operators", "expected_ranking"]
    diag = keyed(data)["diagnostics"]["data"]
    assert diag["config"]["density"] == 0.3 and diag["config"]["trim_scope"] == "tensor"
    assert [e["weight"] for e in diag["experts"]] == [1.0, 2.0, 1.0]
    assert diag["skipped"] == ["bn.num_batches_tracked"]
    assert keyed(data)["expected_ranking"]["data"]["heuristic"] is True
    md = (out / "report.md").read_text()
    assert "## Dispersion reduction by operator" in md and "heuristic" in md
    assert "trimming alone can increase" in md.replace("\n", " ")
    assert "| expert0 |" in md  # folder name, not 'model'
    assert "![" in md and "(cosine.png)" in md

    # the same numbers through the Python API
    api = pool_diagnostics(tmp_path / "base.safetensors",
                           [tmp_path / f"expert{i}" for i in range(3)], weights=[1.0, 2.0, 1.0],
                           config=DiagnosticsConfig(density=0.3))
    assert diag["summary"]["dispersion"] == pytest.approx(api.total.dispersion)
    assert diag["summary"]["pool_conflict_rate"] == pytest.approx(api.total.pool_conflict_rate)


def test_cli_no_plots_and_cli_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_pool(tmp_path)
    spec = _spec(tmp_path, SPEC.replace("trim_scope: tensor", "trim_scope: global"))
    out = tmp_path / "r"
    assert main(["analyze", str(spec), "-o", str(out), "--no-progress", "--no-plots", "--density", "0.5",
                 "--seed", "3"]) == 0
    assert not list(out.glob("*.png"))
    cfg = keyed(json.loads((out / "report.json").read_text()))["diagnostics"]["data"]["config"]
    assert (cfg["density"], cfg["trim_scope"], cfg["seed"]) == (0.5, "global", 3)
    assert "![" not in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("method: ties\nmodels: []\n", "models"),
        ("method: ties\nbase: base.safetensors\nmodels: [expert0]\n", "at least two experts"),
        ("method: ties\nmodels: [expert0, expert1]\n", "needs the base"),
        ("method: tiess\nbase: base.safetensors\nmodels: [expert0, expert1]\n", "did you mean 'ties'"),
        ("method: ties\nbase: base.safetensors\nmodels: [expert0, nowhere]\n", "nowhere"),
        ("method: ties\nbase: base.safetensors\nmodels: [expert0, expert1]\nparameters: {density: 2}\n", "density"),
        ("method: ties\nbase: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
    ],
)
def test_cli_bad_spec_exits_1_with_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    _write_pool(tmp_path, 2)
    spec = _spec(tmp_path, text)
    assert main(["analyze", str(spec), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mergelab analyze: error:") and message in err
    assert not (tmp_path / "out").exists()


def test_cli_shape_mismatch_names_file_and_tensor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_pool(tmp_path, 2)
    save_state_dict({"enc.weight": torch.zeros(3, 3)}, tmp_path / "odd.safetensors")
    spec = _spec(tmp_path, "method: task_arithmetic\nbase: base.safetensors\nmodels: [expert0, odd.safetensors]\n")
    assert main(["analyze", str(spec), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "odd.safetensors" in err and ("enc.bias" in err or "enc.weight" in err)


def test_unknown_top_level_section_is_ignored_with_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_pool(tmp_path, 2)
    spec = _spec(tmp_path, "method: task_arithmetic\nbase: base.safetensors\nmodels: [expert0, expert1]\nnotes: hi\n")
    assert main(["analyze", str(spec), "--out", str(tmp_path / "out"), "--no-progress", "--no-plots"]) == 0
    assert "ignoring unknown top-level section 'notes'" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ report API


def _small_diag():
    base = {"w": torch.zeros(6)}
    experts = [{"w": torch.tensor([1.0, -1.0, 2.0, 0.0, 0.5, 1.0])}, {"w": torch.tensor([1.0, 1.0, -2.0, 1.0, 0.0, 1.0])}]
    return pool_diagnostics(base, experts)


def test_report_sections_can_be_added_by_other_analyses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from matplotlib.figure import Figure as MplFigure

    def draw() -> MplFigure:
        fig = MplFigure(figsize=(2, 2))
        fig.add_subplot().plot([0, 0.5, 1], [1.0, 1.3, 1.1])
        return fig

    def broken() -> MplFigure:
        raise RuntimeError("no data")

    report = diagnostics_report(_small_diag())
    report.add_section("Loss barriers", "Barrier: **0.3**.", data={"barrier": 0.3, "alphas": [0, 0.5, 1]},
                       figures=[Drawing("barrier.png", "loss along the path", draw),
                                Drawing("broken.png", "never drawn", broken)], key="landscape")
    with pytest.raises(ValueError, match="already has a section"):
        report.add_section("again", "", key="landscape")
    with pytest.raises(ValueError, match="already used"):
        report.add_section("clash", "", figures=[Drawing("cosine.png", "", draw)])
    paths = write_report(report, tmp_path / "rep")
    assert (tmp_path / "rep" / "barrier.png").is_file() and not (tmp_path / "rep" / "broken.png").exists()
    assert "broken.png could not be drawn" in caplog.text
    data = json.loads(paths.json.read_text())
    landscape = keyed(data)["landscape"]
    assert (landscape["title"], landscape["data"], landscape["images"], landscape["attachments"]) == (
        "Loss barriers", {"barrier": 0.3, "alphas": [0, 0.5, 1]}, [{"file": "barrier.png", "caption": "loss along the path"}],
        [])
    md = paths.markdown.read_text()
    assert md.index("## Pool diagnostics") < md.index("## Loss barriers")
    assert "(barrier.png)" in md and "broken.png" not in md
    assert data["format"] == 2 and data["study"] == "analyze" and data["versions"]["mergelab"]
    doc = ReportDocument.from_json(paths.out_dir)
    assert doc.section("landscape").data["barrier"] == 0.3 and doc.folder == paths.out_dir


def test_report_without_matplotlib_figures_and_helpers(tmp_path: Path) -> None:
    report = Report("Custom", intro="An intro.")
    report.add_section("Numbers", markdown_table(["a", "b"], [[1, float("nan")], ["x|y", 1e-7]]), data={"v": float("nan")})
    paths = report.write(tmp_path, plots=False)
    assert keyed(json.loads(paths.json.read_text()))["numbers"]["data"] == {"v": None}
    md = paths.markdown.read_text()
    assert "| 1 | n/a |" in md and "x\\|y" in md and "1.000e-07" in md
    assert fmt(12345.678) == "1.235e+04" and fmt(0.5) == "0.5" and fmt(None) == "n/a"
    assert short_labels(["/m/expert_a/model.safetensors", "/m/b.safetensors", "/x/b.safetensors"]) == [
        "expert_a", "2:b", "3:b",
    ]
    with pytest.raises(ValueError, match="png"):
        Drawing("plot.svg", "", lambda: None)  # type: ignore[arg-type,return-value]


def test_reports_written_before_the_one_document_model_still_load(tmp_path: Path) -> None:
    """``report.json`` as ``mergelab analyze`` wrote it before (unversioned, sections keyed by name) and as the
    studies wrote it (format 1) both load as documents, and the old analysis layout draws into HTML."""
    from mergelab.report.html import render_html

    old = {
        "title": "Mergeability report",
        "meta": {"base": "/m/base", "experts": ["/m/a", "/m/b"], "mergelab_version": "0.1.0",
                 "created": "2026-11-02T10:00:00+0000", "spec_sections_not_analysed": []},
        "sections": {
            "diagnostics": {"title": "Pool diagnostics", "data": {"n_experts": 2, "summary": {"dispersion": None}},
                            "figures": ["cosine.png"], "files": ["layers.csv"]},
            "expected_ranking": {"title": "Expected method ranking (heuristic)", "data": {"heuristic": True},
                                 "figures": [], "files": []},
        },
    }
    (tmp_path / "report.json").write_text(json.dumps(old, indent=2))
    doc = ReportDocument.from_json(tmp_path)
    assert [s.key for s in doc.sections] == ["diagnostics", "expected_ranking"]
    diag = doc.section("diagnostics")
    assert diag.title == "Pool diagnostics" and diag.data == {"n_experts": 2, "summary": {"dispersion": None}}
    assert [i.file for i in diag.images] == ["cosine.png"] and diag.attachments == ["layers.csv"]
    assert doc.section("expected_ranking").data == {"heuristic": True}
    assert doc.config == {"base": "/m/base", "experts": ["/m/a", "/m/b"], "spec_sections_not_analysed": []}
    assert (doc.created, doc.versions, doc.study) == ("2026-11-02T10:00:00+0000", {"mergelab": "0.1.0"}, "analyze")
    page = render_html(doc)
    assert "Pool diagnostics" in page and 'src="cosine.png"' in page and 'href="layers.csv"' in page

    format1 = {"format": 1, "title": "t", "study": "scaling_laws", "summary": "s", "config": {"a": 1},
               "sections": [{"title": "S", "text": "x", "figures": [{"id": "f", "title": "F", "series": [
                   {"label": "l", "x": [1, 2], "y": [0.5, None]}]}], "tables": [], "verdicts": []}],
               "created": "", "versions": {}}
    doc1 = ReportDocument.parse(format1)
    assert doc1.format == 2 and doc1.sections[0].figures[0].series[0].y == [0.5, None]
    assert doc1.sections[0].key == "" and doc1.sections[0].images == []
    with pytest.raises(Exception, match="report format 3"):
        ReportDocument.parse({**format1, "format": 3})
