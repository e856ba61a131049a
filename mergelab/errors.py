"""Exception types raised by mergelab.

Every error a user can cause derives from :class:`MergeLabError`, so the CLI can print its message and exit
with a non-zero status instead of a traceback. Messages name the file and, where relevant, the tensor.
"""

from __future__ import annotations


class MergeLabError(Exception):
    """Base class for errors caused by user input (files, specs, parameters)."""


class CheckpointError(MergeLabError):
    """A checkpoint cannot be read: missing, corrupt, truncated, or of an unsupported format."""


class TensorMismatchError(MergeLabError):
    """Input checkpoints disagree: missing or extra keys, shape or dtype mismatches."""


class NonFiniteError(MergeLabError):
    """An input tensor holds NaN or Inf values."""


class SpecError(MergeLabError):
    """A merge (or experiment) specification is invalid: unknown method, bad parameter, empty model list."""


class MethodError(MergeLabError, ValueError):
    """A method cannot merge a tensor with these inputs and parameters (e.g. Multi-SLERP of antipodal vectors
    whose weights cancel); the merge loop adds the tensor's name."""
