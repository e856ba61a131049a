"""Shared test configuration.

Tests use tiny tensors, where torch's intra-op threading costs far more than it saves (on a loaded 2-core
machine a 64-image forward pass took 1.5 s with 2 threads and 0.05 s with 1), so the suite runs with one
thread. Tests that need another setting set and restore it themselves.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture
def single_thread():
    """One intra-op thread for the test, the previous count restored after it (tests that change it, e.g. to
    exercise two compute threads, do not leak the setting). Modules of small-tensor tests use it for every
    test: ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def isolated_cache(monkeypatch: pytest.MonkeyPatch, tmp_path, single_thread):
    """Digest cache in a tmp folder (never ~/.cache), on one intra-op thread (:func:`single_thread`)."""
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
