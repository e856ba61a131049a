"""Reading and writing model checkpoints, one tensor at a time.

* :func:`open_checkpoint` -> :class:`CheckpointReader`: lazy per-tensor reading of safetensors (single
  file, HF folder, sharded with an index) and torch files (``.pt``/``.pth``/``.bin``, sharded ``.bin``).
* :class:`CheckpointWriter`: streaming, sharded, atomic writing of an HF-style safetensors folder.
* :func:`load_state_dict` / :func:`save_state_dict`: whole-model convenience for small models.
* :func:`file_digest`: streamed SHA-256 of a file.

Every problem with a file raises :class:`mergelab.errors.CheckpointError` naming the file and tensor.
"""

from __future__ import annotations

from mergelab.checkpoints.digest import file_digest
from mergelab.checkpoints.reader import CheckpointReader, TensorInfo, load_state_dict, open_checkpoint
from mergelab.checkpoints.writer import CheckpointWriter, save_state_dict

__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "TensorInfo",
    "file_digest",
    "load_state_dict",
    "open_checkpoint",
    "save_state_dict",
]
