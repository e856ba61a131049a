"""No command replaces, deletes or modifies its inputs; outputs that cannot be published atomically are refused.

Covers :mod:`mergelab.output_paths` and every writer that calls it: ``merge`` (Python API and CLI, both
engines, the data-informed path), ``report --out``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from mergelab.checkpoints import load_state_dict, save_state_dict
from mergelab.cli import main
from mergelab.merging import merge
from mergelab.output_paths import OutputPathError, check_replaceable, overlap

pytestmark = pytest.mark.usefixtures("isolated_cache")  # conftest: tmp digest cache, one thread


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(3, generator=g)}


def hf_models(root: Path) -> tuple[Path, list[Path]]:
    """``root/base`` (model.safetensors + config.json) and ``root/e0``, ``root/e1`` (model.safetensors)."""
    base = root / "base"
    base.mkdir(parents=True)
    save_state_dict(_state(0), base / "model.safetensors")
    (base / "config.json").write_text('{"model_type": "tiny"}\n')
    experts = []
    for i in range(2):
        folder = root / f"e{i}"
        folder.mkdir()
        save_state_dict(_state(10 + i), folder / "model.safetensors")
        experts.append(folder)
    return base, experts


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _spec(base: Path, models: list[Path], method: str = "task_arithmetic") -> dict:
    return {"method": method, "base": str(base), "models": [str(m) for m in models]}


TARGETS = {
    "base-folder": lambda root, base, experts: base,
    "expert-folder": lambda root, base, experts: experts[0],
    "input-file": lambda root, base, experts: experts[1] / "model.safetensors",
    "folder-containing-inputs": lambda root, base, experts: root,
    "inside-base": lambda root, base, experts: base / "merged",
    "symlink-to-base": lambda root, base, experts: _link(root.parent / "link", base),
    "base-through-dotdot": lambda root, base, experts: experts[0] / ".." / "base",
}


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target, target_is_directory=True)
    return link


@pytest.mark.parametrize("overwrite", [False, True], ids=["no-overwrite", "overwrite"])
@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_merge_refuses_an_output_overlapping_an_input(tmp_path: Path, target: str, engine: str,
                                                       overwrite: bool) -> None:
    root = tmp_path / "models"
    base, experts = hf_models(root)
    before = snapshot(root)
    out = TARGETS[target](root, base, experts)
    with pytest.raises(OutputPathError, match="refusing to write there") as info:
        merge(_spec(base, experts), out, overwrite=overwrite, progress=False, engine=engine)
    assert str(out) in str(info.value)
    assert snapshot(root) == before  # nothing deleted, modified or added
    assert not [p.name for p in root.parent.iterdir() if p.name.endswith((".tmp", ".old"))]


def test_overlap_is_checked_before_any_input_is_read(tmp_path: Path) -> None:
    # the second expert does not exist: were inputs opened first, the error would be "no such file"
    root = tmp_path / "models"
    base, experts = hf_models(root)
    with pytest.raises(OutputPathError, match=r"it is that input"):
        merge(_spec(base, [experts[0], root / "missing"]), base, overwrite=True, progress=False)


def test_data_informed_merge_refuses_an_expert_folder_before_loading_anything(tmp_path: Path) -> None:
    # not real zoo experts: the refusal must come before the context loads them (which would say so)
    root = tmp_path / "models"
    base, experts = hf_models(root)
    before = snapshot(root)
    with pytest.raises(OutputPathError, match=r"it is that input"):
        merge(_spec(base, experts, method="adamerging"), experts[1], overwrite=True, progress=False)
    # an expert given by its weights file: its folder (head, sidecar) is an input too
    with pytest.raises(OutputPathError, match=r"lies inside"):
        merge(_spec(base, [experts[0] / "model.safetensors"], method="adamerging"), experts[0] / "merged",
              progress=False)
    assert snapshot(root) == before


def test_cli_merge_into_the_base_folder_with_overwrite_loses_nothing(tmp_path: Path, capsys) -> None:
    root = tmp_path / "models"
    base, experts = hf_models(root)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_spec(base, experts)))
    before = snapshot(root)
    assert main(["merge", str(spec_file), "--out", str(base), "--overwrite", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"output {base}: refusing to write there: it is that input: {base}" in err
    assert snapshot(root) == before


def test_a_merge_next_to_its_inputs_is_fine(tmp_path: Path) -> None:
    root = tmp_path / "models"
    base, experts = hf_models(root)
    merge(_spec(base, experts), root.parent / "merged", progress=False)
    expected = {k: _state(0)[k] + (_state(10)[k] - _state(0)[k]) + (_state(11)[k] - _state(0)[k]) for k in _state(0)}
    got = load_state_dict(root.parent / "merged")
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v)
    assert json.loads((root.parent / "merged" / "config.json").read_text()) == {"model_type": "tiny"}


# ------------------------------------------------------------------------------ outputs with no name


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_out_dot_and_root_are_clear_errors(tmp_path: Path, monkeypatch, engine: str) -> None:
    base, experts = hf_models(tmp_path / "models")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(OutputPathError, match=r"output \.: is the current folder, which cannot be replaced "
                                              r"atomically; name a sub-folder instead \(e\.g\. \./merged\)"):
        merge(_spec(base, experts), ".", progress=False, engine=engine)
    with pytest.raises(OutputPathError, match=r"output \.\.: is a parent of the current folder"):
        merge(_spec(base, experts), "..", overwrite=True, progress=False, engine=engine)
    with pytest.raises(OutputPathError, match=r"output /: cannot write a model to the root folder"):
        merge(_spec(base, experts), "/", overwrite=True, progress=False, engine=engine)
    assert list(work.iterdir()) == []


def test_cli_out_dot(tmp_path: Path, monkeypatch, capsys) -> None:
    base, experts = hf_models(tmp_path / "models")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_spec(base, experts)))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["merge", str(spec_file), "--out", ".", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "mergelab merge: error: output .: is the current folder, which cannot be replaced atomically; "
        "name a sub-folder instead (e.g. ./merged)"]


def test_check_replaceable_and_overlap_rules(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert check_replaceable("sub") == tmp_path.resolve() / "sub" or check_replaceable("sub") == tmp_path / "sub"
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert overlap(tmp_path / "a", tmp_path / "a" / "b") == "contains"
    assert overlap(tmp_path / "a" / "b" / "new", tmp_path / "a") == "lies inside"
    assert overlap(tmp_path / "a" / "b" / ".." / "b", tmp_path / "a" / "b") == "is"
    assert overlap(tmp_path / "ab", tmp_path / "a") is None  # a name prefix is not containment
    assert overlap(tmp_path / "a", tmp_path / "ab") is None


# ------------------------------------------------------------------------------------------ report --out


def test_report_refuses_to_overwrite_its_input_document(tmp_path: Path, capsys) -> None:
    from mergelab.report.document import ReportDocument

    study = tmp_path / "study"
    study.mkdir()
    ReportDocument(title="t", study="s", sections=[]).to_json(study)
    doc = study / "report.json"
    before = doc.read_bytes()
    assert main(["report", str(study), "--out", str(doc)]) == 1
    assert "refusing to write there: it is that input" in capsys.readouterr().err
    assert doc.read_bytes() == before
    assert main(["report", str(study), "--out", str(tmp_path / "page.html")]) == 0


def test_analyze_refuses_a_report_folder_inside_an_input(tmp_path: Path, capsys) -> None:
    root = tmp_path / "models"
    base, experts = hf_models(root)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_spec(base, experts)))
    before = snapshot(root)
    assert main(["analyze", str(spec_file), "--out", str(base / "analysis"), "--no-plots"]) == 1
    assert f"--out {base / 'analysis'}: refusing to write there: it lies inside" in capsys.readouterr().err
    assert snapshot(root) == before


def test_finetune_sidecar_json_may_not_replace_its_spec(tmp_path: Path, capsys) -> None:
    spec_file = tmp_path / "expert.json"
    spec_file.write_text('{"task": "digits", "arch": "mlp"}\n')
    assert main(["finetune", str(spec_file), "--json", str(spec_file)]) == 1
    assert f"--json {spec_file}: refusing to write there: it is that input" in capsys.readouterr().err
    assert spec_file.read_text() == '{"task": "digits", "arch": "mlp"}\n'
