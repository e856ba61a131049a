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


def test_digest_cache_never_writes_through_a_planted_symlink(tmp_path, monkeypatch):
    # issue 12: the digest cache wrote digests.<pid>.tmp, a predictable name, following a link planted there
    from mergelab.provenance import input_digest

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("MERGELAB_CACHE", str(cache))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in (f"digests.{os.getpid()}.tmp", ".digests.json.tmp", "digests.tmp"):
        (cache / name).symlink_to(victim)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    expected = "sha256:" + __import__("hashlib").sha256(b"weights").hexdigest()
    assert input_digest(model) == expected
    assert victim.read_text() == "precious"  # the link's target is untouched
    store = cache / "digests.json"
    assert not store.is_symlink() and expected in store.read_text()
    assert sorted(p.name for p in cache.iterdir() if not p.is_symlink()) == ["digests.json"]  # no temporary left
    # a link planted as digests.json itself is replaced, never written through
    store.unlink()
    store.symlink_to(victim)
    assert input_digest(model, use_cache=True) == expected
    assert victim.read_text() == "precious" and not store.is_symlink()


def test_a_hostile_digest_cache_is_ignored(tmp_path, monkeypatch):
    from mergelab.provenance import input_digest

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("MERGELAB_CACHE", str(cache))
    (cache / "digests.json").write_text("[" * 100_000 + "]" * 100_000)  # RecursionError in json.loads
    model = tmp_path / "m.bin"
    model.write_bytes(b"x")
    assert input_digest(model).startswith("sha256:")


def test_open_atomic_binary_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    target = tmp_path / "out" / "figure.png"
    target.parent.mkdir()
    target.symlink_to(victim)
    with atomic_files.open_atomic(target, "wb") as fh:
        fh.write(b"\x89PNG")
    assert victim.read_bytes() == b"precious" and not target.is_symlink() and target.read_bytes() == b"\x89PNG"
    with pytest.raises(RuntimeError), atomic_files.open_atomic(target, "wb") as fh:
        fh.write(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"\x89PNG" and sorted(p.name for p in target.parent.iterdir()) == ["figure.png"]
