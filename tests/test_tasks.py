"""Tests of the offline task suite :mod:`mergelab.tasks`.

Building everything takes ~20 s, so tests build a representative handful of tasks (one per source and
kind of transformation) into temporary cache directories; a module-scoped fixture shares one cache.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mergelab.errors import SpecError
from mergelab.tasks import (
    TaskData,
    get_task,
    list_tasks,
    pool_components,
    pretraining_pool,
    subset,
    task_spec,
)
from mergelab.tasks import cache as task_cache
from mergelab.tasks.base import to_uint8
from mergelab.tasks.sources import digits_split, load_mnist, load_mnist1d, make_mnist1d, mnist_split
from mergelab.tasks.subset import subset_indices

# One task per source / transformation kind; cheap to build.
SAMPLE_TASKS = ("mnist", "mnist_rot45", "mnist_patch_perm", "mnist_noise", "mnist_mod3", "digits", "mnist1d",
                "shapes", "count_dots", "grating_freq")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("task-cache")


@pytest.fixture(scope="module")
def sample(shared_cache: Path) -> dict[str, TaskData]:
    return {name: get_task(name, cache_dir=shared_cache) for name in SAMPLE_TASKS}


@pytest.fixture(scope="module")
def pool(shared_cache: Path) -> TaskData:
    return pretraining_pool(cache_dir=shared_cache)


def _check_format(task: TaskData) -> None:
    for x, y in ((task.x_train, task.y_train), (task.x_test, task.y_test)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.ndim == 4 and tuple(x.shape[1:]) == (1, 28, 28)
        assert y.shape == (x.shape[0],)
        assert torch.isfinite(x).all()
        assert int(y.min()) >= 0 and int(y.max()) < task.num_classes
    # every class occurs in both splits
    assert set(task.y_train.tolist()) == set(range(task.num_classes))
    assert set(task.y_test.tolist()) == set(range(task.num_classes))
    # per-task standardisation with train statistics: train mean ~0, std ~1; test close to that
    assert abs(float(task.x_train.mean())) < 1e-3
    assert abs(float(task.x_train.std()) - 1.0) < 1e-3
    assert abs(float(task.x_test.mean())) < 0.1
    # norm recovers ink intensities in [0, 1]
    mean, std = task.norm
    p = task.x_train * std + mean
    assert float(p.min()) > -1e-4 and float(p.max()) < 1 + 1e-4
    if task.class_names:
        assert len(task.class_names) == task.num_classes


def test_registry_lists_at_least_20_tasks_in_fixed_order() -> None:
    names = list_tasks()
    assert len(names) >= 20
    assert len(set(names)) == len(names)
    assert names == list_tasks()
    assert names[0] == "mnist"
    for name in names:
        spec = task_spec(name)
        assert spec.name == name and spec.num_classes >= 2 and spec.description
        assert name.isidentifier() and name == name.lower()
    assert len({task_spec(n).family for n in names}) >= 5


def test_sample_tasks_format(sample: dict[str, TaskData]) -> None:
    for name, task in sample.items():
        assert task.name == name
        assert task.num_classes == task_spec(name).num_classes
        assert 1000 <= task.n_train <= 4000 and 500 <= task.n_test <= 1000
        _check_format(task)


def test_related_tasks_share_images(sample: dict[str, TaskData], shared_cache: Path) -> None:
    mnist, mod3 = sample["mnist"], sample["mnist_mod3"]
    assert torch.equal(mnist.x_train, mod3.x_train)
    assert torch.equal(mod3.y_train, mnist.y_train % 3)
    inverted = get_task("mnist_invert", cache_dir=shared_cache)
    assert torch.allclose(inverted.x_train, -mnist.x_train, atol=1e-5)  # inversion == negation after standardising
    rot90 = get_task("mnist_rot90", cache_dir=shared_cache)
    ink = rot90.x_train * rot90.norm[1] + rot90.norm[0]
    ink_mnist = mnist.x_train * mnist.norm[1] + mnist.norm[0]
    assert torch.allclose(ink, torch.rot90(ink_mnist, 1, dims=(2, 3)), atol=1e-5)


def test_all_tasks_build_and_match_specs(shared_cache: Path) -> None:
    """Cheap smoke test of the tasks not in the sample: build them and check the format."""
    for name in list_tasks():
        if name in SAMPLE_TASKS:
            continue
        _check_format(get_task(name, cache_dir=shared_cache))


def _digest(task: TaskData) -> str:
    h = hashlib.sha256()
    for t in (task.x_train, task.y_train, task.x_test, task.y_test):
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# sha256 (first 20 hex digits) of the 8-bit images and labels of each task, train then test. A change means
# the generator's output changed: bump the task's version in its spec (or SUITE_VERSION) and update here.
GOLDEN = {
    "mnist": "1ee1bd230cfc9e7f76ed",
    "mnist_rot45": "14ad7ae5680de49d4da8",
    "mnist_patch_perm": "4ee55ea7f786eef366c5",
    "mnist_noise": "f1c4f1ef1d676d33aca0",
    "mnist_mod3": "f7b190ebff424e9069a0",
    "digits": "23ce0e511f84543de2bc",
    "mnist1d": "49e82204a2bd6201a7d1",
    "shapes": "c170c67ef171d75f6834",
    "count_dots": "ec710c085b80d95e8269",
    "grating_freq": "f8b7842fada0248e22ab",
}


def test_golden_digests(sample: dict[str, TaskData]) -> None:
    p, y = load_mnist()
    raw = hashlib.sha256(np.rint(p * 255).astype(np.uint8).tobytes() + y.tobytes()).hexdigest()
    assert raw == "1f75c140503b3082c96134f5593303f3133e59989a92e21f060c644c655c3722"
    for name, task in sample.items():
        h = hashlib.sha256()
        for a in (to_uint8(task.x_train, task.norm), task.y_train.numpy(),
                  to_uint8(task.x_test, task.norm), task.y_test.numpy()):
            h.update(a.tobytes())
        assert h.hexdigest()[:20] == GOLDEN[name], f"task {name!r} changed: bump its version, update GOLDEN"


def test_deterministic_across_cache_dirs_and_processes(tmp_path: Path, sample: dict[str, TaskData]) -> None:
    names = ("mnist_noise", "mnist_patch_perm", "digits", "count_dots", "grating_freq")
    rebuilt = {n: get_task(n, cache_dir=tmp_path / "other") for n in names}
    for n in names:
        for attr in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(getattr(rebuilt[n], attr), getattr(sample[n], attr)), (n, attr)
    # a fresh interpreter, using $MERGELAB_CACHE and a hash seed that changes str hashing
    code = ("import hashlib, sys; from mergelab.tasks import get_task\n"
            "for n in sys.argv[1:]:\n"
            "    t = get_task(n); h = hashlib.sha256()\n"
            "    [h.update(a.numpy().tobytes()) for a in (t.x_train, t.y_train, t.x_test, t.y_test)]\n"
            "    print(n, h.hexdigest())\n")
    env = {"MERGELAB_CACHE": str(tmp_path / "proc"), "PYTHONHASHSEED": "12345",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code, "count_dots", "grating_freq"], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert dict(zip(out[::2], out[1::2])) == {n: _digest(sample[n]) for n in ("count_dots", "grating_freq")}
    assert (tmp_path / "proc" / "tasks").is_dir()


def test_cache_round_trip_and_versioning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "env"))
    first = get_task("digits")  # builds into $MERGELAB_CACHE/tasks
    files = list((tmp_path / "env" / "tasks").glob("digits-v*.npz"))
    assert len(files) == 1 and not list((tmp_path / "env" / "tasks").glob("*.tmp"))
    second = get_task("digits")  # loads
    assert _digest(first) == _digest(second)
    assert (second.name, second.num_classes, second.description, second.class_names, second.norm) == (
        first.name, first.num_classes, first.description, first.class_names, first.norm)

    # an explicit argument wins over the environment variable
    get_task("digits", cache_dir=tmp_path / "arg")
    assert list((tmp_path / "arg").glob("digits-v*.npz"))

    # a corrupt file is rebuilt, not trusted
    files[0].write_bytes(b"not a zip file")
    assert _digest(get_task("digits")) == _digest(first)
    assert np.load(files[0])["images_train"].shape == (first.n_train, 28, 28)

    # a suite version bump invalidates the cache: a new file name, the old one is ignored
    monkeypatch.setattr(task_cache, "SUITE_VERSION", "test-bump")
    get_task("digits")
    assert len(list((tmp_path / "env" / "tasks").glob("digits-v*.npz"))) == 2


def test_version_mismatch_inside_file_is_rebuilt(tmp_path: Path, sample: dict[str, TaskData]) -> None:
    spec = task_spec("digits")
    path = task_cache.cache_path(tmp_path, "digits", spec.version)
    task_cache.save_task(sample["digits"], path, "stale")
    assert task_cache.load_task(path, "digits", task_cache.cache_key(spec.version)) is None
    assert _digest(get_task("digits", cache_dir=tmp_path)) == _digest(sample["digits"])


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MERGELAB_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert task_cache.resolve_cache_dir() == tmp_path / ".cache" / "mergelab" / "tasks"
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "c"))
    assert task_cache.resolve_cache_dir() == tmp_path / "c" / "tasks"
    assert task_cache.resolve_cache_dir(tmp_path / "x") == tmp_path / "x"


def test_subset(sample: dict[str, TaskData]) -> None:
    task = sample["shapes"]
    n = task.n_train
    rows = {tuple(r) for r in task.x_train.reshape(n, -1)[:, ::7].tolist()}
    for ratio in (0.01, 0.1, 0.333, 0.5, 1.0):
        sub = subset(task, ratio, seed=0)
        assert sub.n_train == round(ratio * n)
        assert sub.x_train.shape[1:] == task.x_train.shape[1:]
        assert torch.equal(sub.x_test, task.x_test) and torch.equal(sub.y_test, task.y_test)
        idx = torch.from_numpy(subset_indices(task, ratio, 0))
        assert torch.equal(sub.x_train, task.x_train[idx]) and torch.equal(sub.y_train, task.y_train[idx])
        assert len(set(idx.tolist())) == len(idx)
        assert {tuple(r) for r in sub.x_train.reshape(sub.n_train, -1)[:, ::7].tolist()} <= rows
        # stratified: each class keeps its share, up to one example
        full = np.bincount(task.y_train.numpy(), minlength=task.num_classes)
        part = np.bincount(sub.y_train.numpy(), minlength=task.num_classes)
        assert np.all(np.abs(part - full * sub.n_train / n) <= 1.0 + 1e-9)
    assert torch.equal(subset(task, 1.0, 3).x_train, task.x_train)
    # deterministic by seed, different seeds differ, nested across ratios
    a, b = subset_indices(task, 0.2, 7), subset_indices(task, 0.2, 7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, subset_indices(task, 0.2, 8))
    assert set(subset_indices(task, 0.1, 7)) <= set(a) <= set(subset_indices(task, 0.4, 7))


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan"), float("inf"), "0.5", None, True])
def test_subset_bad_ratio(sample: dict[str, TaskData], ratio: object) -> None:
    with pytest.raises(SpecError, match="data_ratio"):
        subset(sample["digits"], ratio, seed=0)  # type: ignore[arg-type]


def test_subset_ratio_too_small(sample: dict[str, TaskData]) -> None:
    with pytest.raises(SpecError, match="selects no example"):
        subset(sample["digits"], 1e-6, seed=0)


def test_unknown_task_name(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        get_task("mnsit_rot90", cache_dir=tmp_path)
    msg = str(info.value)
    assert "unknown task 'mnsit_rot90'" in msg and "Did you mean 'mnist_rot90'" in msg
    listed = msg.split("Valid tasks")[1]
    assert listed.index("mnist_rot90") < listed.index("shapes")  # close matches first
    assert all(name in listed for name in list_tasks())
    with pytest.raises(SpecError, match="unknown task"):
        get_task("pretraining_pool", cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_pool_format_and_joint_labels(pool: TaskData) -> None:
    comps = pool_components()
    assert pool.num_classes == sum(c.num_classes for c in comps)
    assert [c.offset for c in comps] == list(np.cumsum([0] + [c.num_classes for c in comps[:-1]]))
    _check_format(pool)
    assert not set(c.name for c in comps) & set(list_tasks())
    assert pool.class_names[comps[1].offset].startswith(comps[1].name + ":")


def _mnist_image_hashes(p: np.ndarray) -> set[bytes]:
    """Hashes of raw 8-bit MNIST images recovered from ink intensities."""
    u8 = np.rint(p.reshape(len(p), -1) * 255).astype(np.uint8)
    return {hashlib.sha1(row.tobytes()).digest() for row in u8}


def test_pool_is_disjoint_from_expert_tasks(pool: TaskData, sample: dict[str, TaskData]) -> None:
    # index level: pretrain / expert-train / expert-test partition the 5,000 MNIST digits
    split = mnist_split()
    pre, train, test = (set(a.tolist()) for a in (split.pretrain, split.train, split.test))
    assert not pre & train and not pre & test and not train & test
    assert len(pre) + len(train) + len(test) == 5000
    _, y = load_mnist()
    assert np.all(np.bincount(y[split.pretrain]) == 150)
    tr, te = digits_split()
    assert not set(tr.tolist()) & set(te.tolist()) and len(tr) + len(te) == 1797

    # content level: no MNIST image of the pool appears in any expert MNIST task
    mnist = sample["mnist"]
    mean, std = mnist.norm
    expert = _mnist_image_hashes(torch.cat([mnist.x_train, mnist.x_test]).numpy() * std + mean)
    p_all, _ = load_mnist()
    assert expert == _mnist_image_hashes(p_all[np.concatenate([split.train, split.test])])
    pm, ps = pool.norm
    mnist_rows = torch.cat([pool.y_train, pool.y_test]) < 10  # component 0 = mnist_pretrain
    pool_ink = torch.cat([pool.x_train, pool.x_test])[mnist_rows].numpy().astype(np.float64) * ps + pm
    pool_hashes = _mnist_image_hashes(pool_ink)
    assert len(pool_hashes) == 1500
    assert pool_hashes == _mnist_image_hashes(p_all[split.pretrain])
    assert not pool_hashes & expert

    # MNIST-1D and the procedural generators of the pool are not expert data
    signals = load_mnist1d()
    assert signals["x"].shape == (4000, 40) and signals["x_test"].shape == (1000, 40)
    pool_x = pool.x_train.reshape(pool.n_train, -1)
    for name in ("shapes", "count_dots", "grating_freq"):
        t = sample[name]
        expert_x = (t.x_train.reshape(t.n_train, -1) * t.norm[1] + t.norm[0] - pm) / ps
        assert torch.cdist(expert_x[:200], pool_x[:2000]).min() > 1e-3


def test_mnist1d_does_not_touch_global_rng() -> None:
    import random

    np.random.seed(123)
    random.seed(5)
    expected = np.random.random(3), random.random()
    np.random.seed(123)
    random.seed(5)
    small = make_mnist1d(num_samples=50)
    assert small["x"].shape == (40, 40)
    assert np.array_equal(np.random.random(3), expected[0]) and random.random() == expected[1]
