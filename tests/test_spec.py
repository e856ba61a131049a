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


# hostile YAML (issue 12): deep nesting, alias bombs, cycles, --set values


def test_deeply_nested_spec_yaml_is_an_error_naming_the_file(tmp_path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("method: ties\nparameters: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(SpecError, match=r"deep\.yaml: YAML: nested more than 100 levels deep"):
        load_spec(path)
    path.write_text("method: ties\nparameters: " + "[" * 150 + "]" * 150 + "\n")  # parses, still refused
    with pytest.raises(SpecError, match=r"deep\.yaml: YAML: nested more than 100 levels deep"):
        load_spec(path)


def test_yaml_alias_bomb_and_self_reference_are_errors(tmp_path) -> None:
    # each level refers 10 times to the one before: 10**9 strings once expanded, a few hundred bytes of YAML
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("method: ties\n" + "\n".join(lines) + "\n")
    with pytest.raises(SpecError, match=r"bomb\.yaml: YAML: more than 1000000 values once its aliases are expanded"):
        load_spec(bomb)
    loop = tmp_path / "loop.yaml"
    loop.write_text("method: ties\nparameters: &p {x: *p}\n")
    with pytest.raises(SpecError, match=r"loop\.yaml: YAML: nested more than 100 levels deep \(or it refers to itself\)"):
        load_spec(loop)
    # a few aliases, as people use them, are fine
    ok = tmp_path / "ok.yaml"
    ok.write_text("method: ties\nbase: b\nmodels: [m]\nparameters: &p {density: 0.5}\n"
                  "overrides: [{pattern: '*', parameters: *p}]\n")
    assert load_spec(ok).parameters == {"density": 0.5}


def test_read_yaml_errors_name_their_source() -> None:
    with pytest.raises(SpecError, match=r"--set lr: not valid YAML"):
        read_yaml("[1, 2", source="--set lr")
    with pytest.raises(SpecError, match=r"--set lr: YAML: nested more than 100 levels deep"):
        read_yaml("[" * 5000 + "]" * 5000, source="--set lr")
