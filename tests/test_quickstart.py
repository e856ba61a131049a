"""The quickstart on a tiny zoo: builds experts, compares, writes report.json + report.html, reuses its cache."""

from __future__ import annotations

import functools
import json

import pytest
import torch

import mergelab.quickstart
import mergelab.tasks
from mergelab.cli import main
from mergelab.errors import SpecError
from mergelab.models.pretraining import PretrainConfig
from mergelab.quickstart import run_quickstart
from mergelab.report import ReportDocument
from tiny_zoo import pretrain_tiny

TASKS = ["mnist", "mnist_rot90"]
METHODS = ["pretrained", "individual", "task_arithmetic"]
TINY_EXPERTS = {"steps": 10, "batch_size": 32, "data_ratio": 0.1}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache root holding a tiny pretrained resnet_s (the quickstart then fine-tunes tiny experts)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("qscache")
    pretrain_tiny(root, PretrainConfig(steps=5, batch_size=32, lr=0.05))
    yield root
    torch.set_num_threads(before)


def _run(out, cache, **kw):
    return run_quickstart(out, tasks=TASKS, methods=METHODS, quick=True, cache_dir=cache, zoo_overrides=TINY_EXPERTS,
                          workers=1, progress=False, **kw)


def test_quickstart_builds_compares_reports_and_reuses(cache, tmp_path):
    stages: list[str] = []
    out = tmp_path / "qs"
    first = _run(out, cache, on_stage=stages.append)
    assert len(stages) == 3 and stages[0].startswith("[1/3] zoo") and "[3/3] report" in stages[2]
    assert first.experts_trained == 2 and not first.comparison_cached
    assert [r.method for r in first.table.rows] == METHODS and all(r.error is None for r in first.table.rows)
    for name in ("comparison.csv", "comparison.json", "report.json", "report.html"):
        assert (out / name).is_file(), name
    doc = ReportDocument.from_json(out)
    assert doc.study == "quickstart" and doc.config["quickstart"]["tasks"] == TASKS
    assert doc.config["quickstart"]["quick"] is True and "quick=True" in doc.summary
    page = first.html.read_text()
    assert page.count("<img ") == len(doc.figures()) >= 2 and "task_arithmetic" in page
    # the rerun reuses the experts and the comparison, and gives the same table
    stages.clear()
    second = _run(tmp_path / "again", cache, on_stage=stages.append)
    assert second.comparison_cached and second.experts_trained == 0 and "reusing" in stages[1]
    assert second.table.to_dict()["rows"] == first.table.to_dict()["rows"]
    # other settings (a parameter override) are another cache entry; force recomputes
    third = _run(tmp_path / "other", cache, overrides={"task_arithmetic": {"lambda": 0.5}})
    assert not third.comparison_cached and third.table.row("task_arithmetic").params["lambda"] == 0.5
    forced = _run(tmp_path / "forced", cache, overrides={"task_arithmetic": {"lambda": 0.5}}, force=True)
    assert not forced.comparison_cached


def test_quickstart_cli_prints_table_and_report_path(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mergelab.quickstart, "run_quickstart",
                        functools.partial(run_quickstart, zoo_overrides=TINY_EXPERTS))
    out = tmp_path / "cli"
    code = main(["quickstart", "--quick", "--out", str(out), "--tasks", ",".join(TASKS), "--methods", ",".join(METHODS),
                 "--cache-dir", str(cache), "--workers", "1", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "task_arithmetic" in captured.out and f"report: {out / 'report.html'}" in captured.out
    assert "[1/3] zoo" in captured.err
    assert json.loads((out / "report.json").read_text())["study"] == "quickstart"


def test_quickstart_errors(cache, tmp_path):
    with pytest.raises(SpecError, match="at least one task"):
        run_quickstart(tmp_path, tasks=[], cache_dir=cache)
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(SpecError, match="not a folder"):
        run_quickstart(afile, tasks=TASKS, cache_dir=cache)
    with pytest.raises(SpecError, match="unknown method 'nope'"):  # before any fine-tuning
        run_quickstart(tmp_path / "bad", tasks=TASKS, methods=["nope"], cache_dir=cache)
    with pytest.raises(SpecError, match="no_such_task"):
        run_quickstart(tmp_path / "bad", tasks=["no_such_task"], cache_dir=cache)
