"""mergelab.atomic_files: whole file or nothing, plain permissions, CSV rows."""

from __future__ import annotations

import csv
import os

import pytest

from mergelab import atomic_files
from mergelab.atomic_files import write_csv_atomic, write_text_atomic


def test_writes_and_replaces_with_plain_permissions(tmp_path):
    p = write_text_atomic(tmp_path / "sub" / "a.json", "one\n")
    assert p.read_text() == "one\n"
    assert os.stat(p).st_mode & 0o777 == 0o666 & ~atomic_files._UMASK  # not mkstemp's 0o600
    write_text_atomic(p, "two\n")
    assert p.read_text() == "two\n" and sorted(x.name for x in p.parent.iterdir()) == ["a.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    p = write_text_atomic(tmp_path / "a.txt", "good")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(atomic_files.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(p, "bad")
    assert p.read_text() == "good" and [x.name for x in tmp_path.iterdir()] == ["a.txt"]


def test_csv_rows_round_trip(tmp_path):
    p = write_csv_atomic(tmp_path / "t.csv", ["a", "b"], ([i, f"x,{i}"] for i in range(3)))
    with p.open(newline="") as fh:
        assert list(csv.reader(fh)) == [["a", "b"], ["0", "x,0"], ["1", "x,1"], ["2", "x,2"]]
