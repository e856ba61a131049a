"""Config/tokenizer files copied next to a merged model: regular files only, links kept inside the model folder
(or a Hugging Face cache's blob store), sizes capped (mergelab.checkpoints.support_files.support_files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mergelab.checkpoints import save_state_dict
from mergelab.checkpoints import support_files as support_module
from mergelab.checkpoints.support_files import copy_support_files, support_files
from mergelab.errors import CheckpointError
from mergelab.merging import merge

pytestmark = pytest.mark.usefixtures("isolated_cache")


def model_folder(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    save_state_dict({"w": torch.full((2, 2), float(seed))}, folder / "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "tiny"}\n')
    return folder


def merge_from(tmp_path: Path, base: Path) -> Path:
    expert = model_folder(tmp_path / "expert", seed=1)
    out = tmp_path / "out"
    merge({"method": "task_arithmetic", "base": str(base), "models": [str(expert)]}, out, progress=False)
    return out


def test_a_link_out_of_the_model_folder_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    base = model_folder(tmp_path / "base")
    (tmp_path / "secret.txt").write_text("the password")
    (base / "tokenizer_config.json").symlink_to("../secret.txt")
    with pytest.raises(CheckpointError) as info:
        merge_from(tmp_path, base)
    assert str(info.value) == (
        f"{base / 'tokenizer_config.json'}: refusing to copy a symlink to {(tmp_path / 'secret.txt').resolve()}, "
        f"outside the model folder {base.resolve()}, into the merged model"
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]  # refused before the merge


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_a_link_to_a_device_is_refused(tmp_path: Path, device: str) -> None:
    base = model_folder(tmp_path / "base")
    (base / "vocab.txt").symlink_to(device)
    with pytest.raises(CheckpointError, match=rf"vocab\.txt: refusing to copy a symlink to {device}, outside"):
        support_files(base)


def test_devices_and_fifos_inside_the_folder_are_refused(tmp_path: Path) -> None:
    base = model_folder(tmp_path / "base")
    os.mkfifo(base / "vocab.txt")  # opening it to copy would block forever
    with pytest.raises(CheckpointError, match=r"vocab\.txt: refusing to copy a FIFO into the merged model "
                                              r"\(regular files only\)"):
        copy_support_files(base, tmp_path / "dest")
    (base / "vocab.txt").unlink()
    (base / "tok").mkdir()
    (base / ".cache").mkdir()  # hidden folders are not copied, but a link may point there
    os.mkfifo(base / ".cache" / "fifo")
    (base / "tok" / "vocab.txt").symlink_to("../.cache/fifo")
    with pytest.raises(CheckpointError, match=r"tok/vocab\.txt: refusing to copy a symlink to .*/fifo, a FIFO"):
        copy_support_files(base, tmp_path / "dest")


def test_links_inside_the_folder_are_copied_as_regular_files(tmp_path: Path) -> None:
    base = model_folder(tmp_path / "base")
    (base / "shared").mkdir()
    (base / "shared" / "tok.json").write_text('{"vocab": 3}')
    (base / "tokenizer.json").symlink_to("shared/tok.json")
    out = merge_from(tmp_path, base)
    assert not (out / "tokenizer.json").is_symlink()
    assert (out / "tokenizer.json").read_text() == '{"vocab": 3}'
    assert (out / "shared" / "tok.json").read_text() == '{"vocab": 3}'
    assert (out / "config.json").read_text() == '{"model_type": "tiny"}\n'


def test_a_hugging_face_snapshot_may_link_into_its_blob_store(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "0a1b").write_text('{"model_type": "tiny"}\n')
    (repo / "blobs" / "2c3d").write_text('{"do_lower_case": true}\n')
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_state_dict({"w": torch.zeros(2, 2)}, snapshot / "model.safetensors")
    (snapshot / "config.json").symlink_to("../../blobs/0a1b")
    (snapshot / "1_Pooling").mkdir()
    (snapshot / "1_Pooling" / "config.json").symlink_to("../../../blobs/2c3d")
    out = merge_from(tmp_path, snapshot)
    assert (out / "config.json").read_text() == '{"model_type": "tiny"}\n'
    assert (out / "1_Pooling" / "config.json").read_text() == '{"do_lower_case": true}\n'
    # another repository's blobs are outside
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    (other / "ffff").write_text("other")
    (snapshot / "special_tokens_map.json").symlink_to(other / "ffff")
    with pytest.raises(CheckpointError, match=r"special_tokens_map\.json: refusing to copy a symlink"):
        support_files(snapshot)


def test_support_file_sizes_are_capped(tmp_path: Path, monkeypatch) -> None:
    base = model_folder(tmp_path / "base")  # config.json: 23 bytes
    (base / "vocab.txt").write_bytes(b"x" * 101)
    monkeypatch.setattr(support_module, "MAX_SUPPORT_FILE_BYTES", 100)
    with pytest.raises(CheckpointError, match=r"vocab\.txt: 101 bytes, over the 100 bytes a config/tokenizer file "
                                              r"may have \(MAX_SUPPORT_FILE_BYTES\)"):
        support_files(base)
    monkeypatch.setattr(support_module, "MAX_SUPPORT_FILE_BYTES", 1000)
    monkeypatch.setattr(support_module, "MAX_SUPPORT_TOTAL_BYTES", 120)
    with pytest.raises(CheckpointError, match=r"base: config/tokenizer files over 120 bytes in total "
                                              r"\(MAX_SUPPORT_TOTAL_BYTES\), reached at vocab\.txt"):
        copy_support_files(base, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()  # checked before anything is copied
