"""The merge spec: YAML parsing details and sizes."""

from __future__ import annotations

import pytest

from mergelab.errors import SpecError
from mergelab.spec import load_spec, parse_size, read_yaml


def test_yaml_exponent_floats_are_floats() -> None:
    # PyYAML alone reads 1e-6 as the string '1e-6'; strict parameter models would then reject it
    data = read_yaml("a: 1e-6\nb: 1.0e-6\nc: 3\nd: .5\ne: -2E+3\nf: abc\ng: 2.5\nh: .inf")
    assert data == {"a": 1e-6, "b": 1e-6, "c": 3, "d": 0.5, "e": -2000.0, "f": "abc", "g": 2.5, "h": float("inf")}
    assert isinstance(data["c"], int)


def test_spec_file_with_exponent_parameter(tmp_path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("method: dare_linear\nbase: b\nmodels: [m]\nparameters: {density: 5e-1}\n")
    spec = load_spec(path)
    assert spec.parameters == {"density": 0.5}
    assert spec.base == tmp_path / "b"


@pytest.mark.parametrize(("text", "size"), [("500MB", 500 * 10**6), ("2GB", 2 * 10**9), ("1.5GiB", int(1.5 * 2**30)),
                                             (1024, 1024), ("123", 123)])
def test_parse_size(text, size) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["-1GB", "lots", 0, True])
def test_parse_size_rejects(bad) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_empty_spec_file(tmp_path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("")
    with pytest.raises(SpecError, match="empty"):
        load_spec(path)
