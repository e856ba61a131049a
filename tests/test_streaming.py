"""Tests for the fast streaming path: block-wise methods equal their whole-tensor compositions bit for bit
(whatever the block size, block order and number of compute threads), the exact block-wise selection, the
engine's read/compute/write pipeline and its output-only finiteness check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergelab import ops
from mergelab.merging import numpy_backend as numpy_engine
from mergelab.merging import numpy_kernels as numpy_ties
from mergelab.ops import selection as order_stats
from mergelab.checkpoints import open_checkpoint, save_state_dict
from mergelab.merging import merge
from mergelab.errors import NonFiniteError
from mergelab.merging.torch_backend import kernel
from mergelab.merging.torch_kernels import KERNELS, PER_MODEL_KERNELS
from mergelab.methods import METHODS
from mergelab.methods import TensorInputs, get_method
from mergelab.ops import blocks as blocks_mod


pytestmark = pytest.mark.usefixtures("isolated_cache")  # conftest: tmp digest cache, one thread


def _small_blocks(monkeypatch: pytest.MonkeyPatch, block: int = 37, small: int = 50, sample: int = 64) -> None:
    """Blocks, selection cut-off and sample small enough that tiny tensors take every block-wise path."""
    monkeypatch.setattr(blocks_mod, "BLOCK", block)
    monkeypatch.setattr(numpy_engine, "BLOCK", block)  # the numpy engine's blocks too
    monkeypatch.setattr(numpy_ties, "BLOCK", block)
    monkeypatch.setattr(order_stats, "SMALL", small)
    monkeypatch.setattr(order_stats, "SAMPLE", sample)


def _inputs(n_experts: int, n: int, dtype: torch.dtype, seed: int = 0, scale: float = 0.01):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    experts = [(base.float() + scale * torch.randn(n, generator=g)).to(dtype) for _ in range(n_experts)]
    return base, experts


def _ties_reference(base, experts, weights, p):
    """TIES as the catalog specifies it: the whole-tensor composition trim -> elect_sign -> disjoint_mean -> scale."""
    return get_method("ties").reference(TensorInputs("w", base, experts, weights), p)


#: parameters each kernel is checked with beyond its defaults (several per method where a path differs)
KERNEL_CASES: list[tuple[str, dict, int]] = [
    ("weight_average", {}, 3),
    ("task_arithmetic", {"lambda": 0.6}, 3),
    ("ties", {"trim_scope": "tensor", "density": 0.3, "lambda": 0.6}, 3),
    ("ties", {"trim_scope": "tensor", "density": 0.3, "rescale": "l1", "lambda": 0.6}, 3),
    ("ties", {"trim_scope": "tensor", "density": 0.02, "rescale": "l1", "sign_election": "count",
              "disjoint_divisor": "weight"}, 3),
    ("ties", {"trim_scope": "tensor", "density": 1.0, "rescale": "l1"}, 3),
    ("dare_linear", {"density": 0.3, "seed": 4, "lambda": 0.6}, 3),
    ("dare_linear", {"density": 0.6, "rescale": "l1"}, 3),
    ("dare_linear", {"density": 0.6, "rescale": "none"}, 3),
    ("dare_linear", {"density": 1.0}, 3),
    ("dare_ties", {"density": 0.4, "sign_election": "count", "disjoint_divisor": "weight", "lambda": 0.6}, 3),
    ("breadcrumbs", {"lambda": 0.6}, 3),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}, 3),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.0}, 3),
    ("breadcrumbs", {"density": 1.0}, 3),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1, "rescale": "l1", "lambda": 0.6}, 3),
    ("model_stock", {}, 3),
    ("slerp", {"t": 0.3}, 2),
    ("slerp", {"t": 0.7}, 1),
    ("tsv_merge", {"lambda": 0.6}, 3),
    ("iso_c", {"lambda": 0.6}, 3),
    ("iso_cts", {"lambda": 0.6, "common_space_fraction": 0.5}, 3),
    ("della", {"density": 0.6, "epsilon": 0.2, "seed": 3, "lambda": 0.7}, 3),
    ("della", {"density": 0.5, "epsilon": 0.15, "spacing": "mergekit", "rescale": "l1",
               "disjoint_divisor": "weight", "sign_test": "weighted"}, 3),
    ("della_linear", {"density": 0.4, "epsilon": 0.1, "rescale": "none"}, 3),
    ("della_linear", {"density": 0.5, "rescale": "l1"}, 3),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1, "lambda": 0.6}, 3),
    ("breadcrumbs_ties", {"disjoint_divisor": "none", "sign_test": "weighted"}, 3),
    ("breadcrumbs_ties", {"density": 0.3, "gamma": 0.05, "rescale": "l1", "disjoint_divisor": "weight",
                          "sign_test": "weighted", "zero_sign": "positive"}, 3),
    ("sce", {}, 3),
    ("sce", {"select_topk": 0.3}, 3),
    ("nuslerp", {}, 2),
    ("multislerp", {}, 3),
    ("karcher", {}, 3),
    ("nearswap", {"t": 0.01}, 1),
    ("arcee_fusion", {}, 1),
    ("passthrough", {"scale": 0.5}, 1),
    ("passthrough", {}, 1),
    ("ram", {}, 3),
    ("ram", {"epsilon": 0.01}, 3),
    ("ramplus_tl", {"epsilon": 0.012}, 3),
    ("ramplus_tl", {"epsilon": 0.01, "r": 0.5, "alpha": 2.0}, 2),
]

#: methods whose statistics are per row: checked on a matrix too (rows over several blocks)
ROW_CASES: list[tuple[str, dict, int]] = [
    ("della", {"density": 0.6, "epsilon": 0.2, "seed": 3}, 3),
    ("della_linear", {"density": 0.5, "spacing": "mergekit", "rescale": "l1"}, 3),
    ("arcee_fusion", {}, 1),
    ("nuslerp", {"flatten": False}, 2),
    ("nuslerp", {"flatten": False, "row_wise": True}, 2),
    ("sce", {"select_topk": 0.5}, 3),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}, 3),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("name", "params", "n_experts"), ROW_CASES)
def test_row_kernels_equal_their_references_on_matrices(monkeypatch, dtype, name, params, n_experts):
    """Kernels working on blocks of whole rows (DELLA's ranks, Arcee Fusion's softmax) equal the reference
    on a 40 x 25 matrix (rows of 25 in blocks of 37 entries: one row per block), two threads."""
    _small_blocks(monkeypatch)
    monkeypatch.setenv("MERGELAB_COMPUTE_THREADS", "2")
    base, experts = _inputs(n_experts, 1000, dtype, seed=2, scale=0.5)
    base, experts = base.reshape(40, 25), [e.reshape(40, 25) for e in experts]
    method = get_method(name)
    p = method.parse_params(params)
    weights = [1.0, 0.5, 2.0][:n_experts] if method.uses_weights else [1.0] * n_experts
    inp = TensorInputs("w", base, experts, weights)
    assert torch.equal(kernel(name)(inp, p), method.reference(inp, p))


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("rescale", ["l1", "inverse", "none"])
def test_della_kernels_take_per_model_density_and_epsilon(monkeypatch, name, rescale):
    """The models' own density and epsilon (mergekit's DELLA configs set them per model) run on the block
    kernel, not the whole-tensor reference (:data:`PER_MODEL_KERNELS`), bit for bit the reference: three
    experts of densities 0.3, 1 (not pruned: no draws, no rescaling) and 0.7, on a 40 x 25 bf16 matrix in
    blocks of one row, two threads."""
    _small_blocks(monkeypatch)
    monkeypatch.setenv("MERGELAB_COMPUTE_THREADS", "2")
    base, experts = _inputs(3, 1000, torch.bfloat16, seed=4, scale=0.5)
    base, experts = base.reshape(40, 25), [e.reshape(40, 25) for e in experts]
    method = get_method(name)
    p = method.parse_params({"spacing": "mergekit", "rescale": rescale, "seed": 7})
    own = [{"density": 0.3, "epsilon": 0.2}, {"density": 1.0}, {"density": 0.7, "epsilon": 0.05}]
    inp = TensorInputs("w", base, experts, [1.0, 0.5, 2.0], model_params=own)
    assert name in PER_MODEL_KERNELS
    out = kernel(name)(inp, p)
    assert torch.equal(out, method.reference(inp, p))
    assert not torch.equal(out, kernel(name)(TensorInputs("w", base, experts, [1.0, 0.5, 2.0]), p))


def test_every_method_has_a_torch_kernel_and_a_case():
    """Every data-free method of the catalog runs as a block kernel on the torch back-end (none falls back
    to its whole-tensor reference), and each is checked below."""
    assert set(KERNELS) == set(METHODS)
    assert {name for name, _, _ in KERNEL_CASES} == set(KERNELS)
    for name in METHODS:
        assert kernel(name) is KERNELS[name]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("name", "params", "n_experts"), KERNEL_CASES)
def test_every_torch_kernel_equals_its_catalog_reference(monkeypatch, dtype, name, params, n_experts):
    """Each block kernel the torch back-end registers computes its method's reference composition bit for
    bit (several blocks, two threads, non-unit weights where the method takes them; rounded once into the
    output dtype when asked), DARE's random masks included."""
    _small_blocks(monkeypatch)
    monkeypatch.setenv("MERGELAB_COMPUTE_THREADS", "2")
    base, experts = _inputs(n_experts, 1000, dtype)
    method = get_method(name)
    p = method.parse_params(params)
    weights = [1.0, 0.5, 2.0][:n_experts] if method.uses_weights else [1.0] * n_experts
    inp = TensorInputs("w", base, experts, weights)
    ref = method.reference(inp, p)
    assert torch.equal(kernel(name)(inp, p), ref)
    out_bf16 = kernel(name)(TensorInputs("w", base, experts, weights, out_dtype=torch.bfloat16), p)
    assert torch.equal(out_bf16, ref.to(torch.bfloat16))
    empty = TensorInputs("e", base[:0], [e[:0] for e in experts], weights)
    assert kernel(name)(empty, p).shape == (0,)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor (so -0.0 and +0.0 differ, unlike ``torch.equal``)."""
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", sorted(PER_MODEL_KERNELS))
def test_per_model_kernels_equal_their_references_with_per_model_parameters(monkeypatch, dtype, name):
    """A kernel in PER_MODEL_KERNELS reads each model's own density and gamma (DELLA: epsilon) as its
    reference does (here three different bands or drop spreads, one expert whole at density 1), bit for bit;
    the engine runs it on such specs."""
    _small_blocks(monkeypatch)
    monkeypatch.setenv("MERGELAB_COMPUTE_THREADS", "2")
    base, experts = _inputs(3, 1000, dtype)
    method = get_method(name)
    if name.startswith("della"):
        p = method.parse_params({"density": 0.7, "spacing": "mergekit", "rescale": "l1"})
        model_params = [{"density": 0.5, "epsilon": 0.2}, {"density": 1.0}, {"epsilon": 0.05}]
    else:
        p = method.parse_params({"density": 0.7, "gamma": 0.05})
        model_params = [{"density": 0.5, "gamma": 0.1}, {"density": 1.0}, {"gamma": 0.0}]
    inp = TensorInputs("w", base, experts, [1.0, 0.5, 2.0], model_params=model_params)
    ref = method.reference(inp, p)
    assert torch.equal(_bits(kernel(name)(inp, p)), _bits(ref))
    plain = method.reference(TensorInputs("w", base, experts, [1.0, 0.5, 2.0]), p)
    assert not torch.equal(ref, plain)  # the per-model values made a difference


def test_dare_kernel_draws_the_reference_masks_block_by_block(monkeypatch):
    """DARE's masks come from one generator per expert drawn in flat order, so a draw per block of 37
    equals the reference's one draw over the tensor: the kept positions are the same."""
    _small_blocks(monkeypatch)
    base, experts = _inputs(2, 1000, torch.float32, seed=5)
    p = get_method("dare_linear").parse_params({"density": 0.5, "seed": 11, "rescale": "none"})
    inp = TensorInputs("layer.w", base, experts[:1], [1.0])
    out = kernel("dare_linear")(inp, p) - base
    mask = torch.rand(1000, generator=inp.generator(11, 0)) < 0.5
    assert torch.equal(out != 0, mask & (experts[0] != base))
    assert 400 < int(mask.sum()) < 600


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize(
    ("density", "sign_election", "divisor", "weights"),
    [(0.5, "mass", "weight", [1.0, 1.0, 1.0]), (0.2, "count", "count", [1.0, 0.5, 2.0]),
     (0.7, "mass", "weight", [1.0, -0.5, 2.0]), (1.0, "mass", "count", [1.0, 1.0, 1.0])],
)
def test_blockwise_ties_equals_whole_tensor(monkeypatch, dtype, threads, density, sign_election, divisor, weights):
    _small_blocks(monkeypatch)
    monkeypatch.setenv("MERGELAB_COMPUTE_THREADS", threads)
    base, experts = _inputs(3, 1000, dtype)  # bf16: task vectors tie massively at the threshold
    p = get_method("ties").parse_params({"density": density, "trim_scope": "tensor",
                                         "sign_election": sign_election, "disjoint_divisor": divisor,
                                         "lambda": 0.7})
    out = kernel("ties")(TensorInputs("w", base, experts, weights), p)
    ref = _ties_reference(base, experts, weights, p)
    assert torch.equal(out, ref)
    # rounded once into the output dtype when the engine asks for it
    out_bf16 = kernel("ties")(TensorInputs("w", base, experts, weights, out_dtype=torch.bfloat16), p)
    assert torch.equal(out_bf16, ref.to(torch.bfloat16))
    if density < 1.0:  # the tie rule keeps exactly k entries of each trimmed task vector
        k = ops.keep_count(1000, density)
        for e in experts:
            trim = ops.trim(e.float() - base.float(), density)
            assert int(torch.count_nonzero(trim)) <= k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ties", [None, 0, 5])
def test_blockwise_ties_rescale_l1_at_whole_model_thresholds(monkeypatch, dtype, ties):
    """``trim_scope: global`` with ``rescale: l1``: the threshold is given (the whole model's), the norms are
    this tensor's; blocks in order when a tie quota is counted over the tensor (``ties`` 0 or 5: the norm pass
    must not spend the merge pass's quota). Bit for bit the reference, and the trimmed vectors' L1 norm is the
    task vector's."""
    _small_blocks(monkeypatch)
    monkeypatch.setenv("MERGELAB_COMPUTE_THREADS", "2")
    base, experts = _inputs(3, 1000, dtype, seed=4)
    taus = [e.float() - base.float() for e in experts]
    thresholds = [float(ops.kth_largest(t.abs(), 300)) for t in taus]
    p = get_method("ties").parse_params({"density": 0.3, "rescale": "l1"})
    inp = TensorInputs("w", base, experts, [1.0, 0.5, 2.0], thresholds=thresholds,
                       tie_quotas=None if ties is None else [ties] * 3)
    assert torch.equal(_bits(kernel("ties")(inp, p)), _bits(get_method("ties").reference(inp, p)))
    for tau, t in zip(taus, thresholds):
        trimmed = ops.trim(tau, 0.3, threshold=t, ties=ties, rescale="l1")
        assert float(trimmed.abs().double().sum()) == pytest.approx(float(tau.abs().double().sum()), rel=1e-6)


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_rescale_none_is_the_default_and_l1_changes_the_merge(monkeypatch, name):
    """``rescale`` defaults to ``none`` (the output without the parameter, bit for bit) and ``l1`` scales each
    sparsified task vector up (||tau||_1 / ||T(tau)||_1 > 1), so the merge moves further from the base."""
    _small_blocks(monkeypatch)
    base, experts = _inputs(3, 1000, torch.float32, seed=6)
    method = get_method(name)
    extra = {"trim_scope": "tensor", "density": 0.3} if name == "ties" else {"density": 0.5, "gamma": 0.05}
    inp = TensorInputs("w", base, experts, [1.0, 0.5, 2.0])
    plain = kernel(name)(inp, method.parse_params(extra))
    assert method.parse_params(extra).rescale == "none"
    assert torch.equal(plain, kernel(name)(inp, method.parse_params({**extra, "rescale": "none"})))
    scaled = kernel(name)(inp, method.parse_params({**extra, "rescale": "l1"}))
    assert float((scaled - base).abs().sum()) > 1.2 * float((plain - base).abs().sum())


def test_blockwise_ties_bracket_miss_falls_back(monkeypatch):
    _small_blocks(monkeypatch)
    monkeypatch.setattr(order_stats, "WIDTH", 0.0)  # a bracket of one sample rank: the exact pass misses
    base, experts = _inputs(2, 900, torch.float32, seed=3)
    p = get_method("ties").parse_params({"density": 0.3, "trim_scope": "tensor"})
    out = kernel("ties")(TensorInputs("w", base, experts, [1.0, 1.0]), p)
    assert torch.equal(out, _ties_reference(base, experts, [1.0, 1.0], p))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_blockwise_task_arithmetic_and_average_equal_whole_tensor(monkeypatch, dtype):
    _small_blocks(monkeypatch)
    base, experts = _inputs(3, 500, dtype, seed=1)
    w = [1.0, 0.3, -0.7]
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    out = kernel("task_arithmetic")(
        TensorInputs("w", base, experts, w, compute_dtype=cd), get_method("task_arithmetic").parse_params({"lambda": 0.4}))
    acc = torch.zeros(500, dtype=cd)
    for e, wi in zip(experts, w):
        acc.add_(e.to(cd) - base.to(cd), alpha=wi)
    assert torch.equal(out, acc.mul_(0.4).add_(base.to(cd)))
    out = kernel("weight_average")(TensorInputs("w", None, experts, w, compute_dtype=cd),
                                             get_method("weight_average").parse_params({}))
    first = experts[0].to(cd)
    ref = first + ops.weighted_mean([e.to(cd) - first for e in experts], w)
    assert torch.equal(out, ref)


def test_block_kth_largest_any_order_and_tie_quotas(monkeypatch):
    monkeypatch.setattr(order_stats, "SAMPLE", 256)
    g = torch.Generator().manual_seed(5)
    values = torch.randint(0, 7, (5000,), generator=g).float()  # massive ties
    block = 333
    starts = list(range(0, 5000, block))
    for k in (1, 17, 2500, 4999, 5000):
        idx = torch.randint(0, 5000, (256,), generator=g)
        sel = ops.BlockKthLargest(5000, k, values[idx], len(starts))
        for j in reversed(range(len(starts))):  # any order
            sel.observe(j, values[starts[j]: starts[j] + block])
        found = sel.result()
        t_ref = float(ops.kth_largest(values, k))
        if found is None:  # allowed (bracket miss), never wrong
            continue
        t, above = found
        assert t == t_ref and above == int((values > t_ref).sum())
        quotas = sel.tie_quotas(k - above)
        counts = sel.tie_counts()
        assert sum(quotas) == k - above and all(0 <= q <= c for q, c in zip(quotas, counts))


# --------------------------------------------------------------------------------------------- engine


def _state(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb": torch.randn(300, 7, generator=g).to(dtype),
        "a.weight": torch.randn(40, 30, generator=g).to(dtype),
        "a.bias": torch.randn(30, generator=g).to(dtype),
        "steps": torch.tensor(seed, dtype=torch.int64),
        "b.weight": torch.randn(120, 11, generator=g).to(dtype),
    }


def _write(folder: Path, n: int = 3, dtype=torch.bfloat16):
    folder.mkdir(parents=True, exist_ok=True)
    base = _state(0, dtype)
    base_path = save_state_dict(base, folder / "base.safetensors")
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        e = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(dtype) if v.is_floating_point() else v
             for k, v in base.items()}
        paths.append(save_state_dict(e, folder / f"e{i}.safetensors"))
    return base_path, paths


@pytest.mark.parametrize(
    ("method", "params", "engine"),
    [("task_arithmetic", {"lambda": 0.5}, "numpy"), ("task_arithmetic", {"lambda": 0.5}, "torch"),
     ("weight_average", {}, "numpy"), ("weight_average", {}, "torch"), ("dare_linear", {"density": 0.6}, "auto"),
     ("ties", {"density": 0.4, "trim_scope": "tensor"}, "numpy"),
     ("ties", {"density": 0.4, "trim_scope": "tensor"}, "torch"),
     ("ties", {"density": 0.3, "trim_scope": "global"}, "numpy"),
     ("ties", {"density": 0.3, "trim_scope": "global"}, "torch")],
)
def test_pipeline_equals_per_tensor_merge(tmp_path, monkeypatch, method, params, engine):
    """Both engines' pipelines and block-wise methods write exactly what calling the (torch) method on each
    tensor gives, with the default blocks and with tiny ones."""
    base_path, paths = _write(tmp_path / "in")
    spec = {"method": method, "base": str(base_path), "models": [str(p) for p in paths], "parameters": params}
    result = merge(spec, tmp_path / "big", progress=False, engine=engine)
    assert result.record["engine"] == ("torch" if engine == "auto" else engine)
    _small_blocks(monkeypatch, block=29, small=40, sample=64)
    merge(spec, tmp_path / "small", progress=False, engine=engine)
    with open_checkpoint(tmp_path / "big") as big, open_checkpoint(tmp_path / "small") as small:
        assert big.keys() == small.keys()
        for name in big.keys():
            assert torch.equal(big.get(name), small.get(name)), name
        if params.get("trim_scope") == "global":
            return  # thresholds come from the engine's whole-model pass
        m = get_method(method)
        p = m.parse_params(params)
        readers = [open_checkpoint(x) for x in [base_path, *paths]]
        try:
            for name in big.keys():
                b, *es = [r.get(name) for r in readers]
                if not b.is_floating_point():
                    assert torch.equal(big.get(name), b)
                    continue
                ref = kernel(m)(TensorInputs(name, b, es, [1.0] * len(es)), p).to(b.dtype)
                assert torch.equal(big.get(name), ref), name
        finally:
            for r in readers:
                r.close()


@pytest.mark.parametrize(("method", "engine"), [("task_arithmetic", "numpy"), ("task_arithmetic", "torch"),
                                                ("weight_average", "numpy"), ("weight_average", "torch"),
                                                ("dare_linear", "torch"), ("ties", "numpy"),
                                                ("ties", "torch")])
@pytest.mark.parametrize("where", ["base", "expert"])
def test_output_only_finite_check_names_the_input(tmp_path, method, engine, where):
    """Methods whose output shows every non-finite input (the linear ones, the numpy engine's TIES) check only
    their output; a NaN/Inf in an input is still named with file and tensor."""
    base_path, paths = _write(tmp_path / "in", dtype=torch.float32)
    bad_path = base_path if where == "base" else paths[1]
    with open_checkpoint(bad_path) as r:
        state = {k: r.get(k).clone() for k in r.keys()}
    state["a.bias"][3] = float("inf") if where == "base" else float("nan")
    save_state_dict(state, bad_path)
    spec = {"method": method, "base": str(base_path), "models": [str(p) for p in paths]}
    if method == "ties":
        spec["parameters"] = {"trim_scope": "tensor", "density": 0.5}
    if method == "weight_average" and where == "base":
        spec["models"] = [str(base_path), *spec["models"][1:]]
    with pytest.raises(NonFiniteError) as info:
        merge(spec, tmp_path / "out", progress=False, engine=engine)
    msg = str(info.value)
    assert str(bad_path) in msg and "'a.bias'" in msg and ("Inf" in msg or "NaN" in msg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize(("dtype", "lam"), [(torch.float32, 1e40), (torch.bfloat16, 1e40), (torch.float16, 1e8)])
def test_overflowing_output_is_an_error_naming_the_result(tmp_path, engine, dtype, lam):
    """Finite inputs whose merge overflows the output dtype (float16 already at 65520) are refused."""
    base_path, paths = _write(tmp_path / "in", dtype=dtype)
    spec = {"method": "task_arithmetic", "base": str(base_path), "models": [str(p) for p in paths],
            "parameters": {"lambda": lam}}
    with pytest.raises(NonFiniteError, match="merge result"):
        merge(spec, tmp_path / "out", progress=False, engine=engine)
    assert not (tmp_path / "out").exists()


def _layered(seed: int, layers: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(50, 10, generator=g).bfloat16()}
    for i in range(layers):
        state[f"model.layers.{i}.self_attn.q.weight"] = torch.randn(20, 10, generator=g).bfloat16()
        state[f"model.layers.{i}.mlp.up.weight"] = torch.randn(30, 10, generator=g).bfloat16()
        state[f"model.layers.{i}.position"] = torch.tensor([seed, i], dtype=torch.int64)
    state["model.norm.weight"] = torch.randn(10, generator=g).bfloat16()
    state["lm_head.weight"] = torch.randn(50, 10, generator=g).bfloat16()
    return state


@pytest.mark.parametrize(("method", "params", "engine"), [
    ("task_arithmetic", {"lambda": 0.7}, "numpy"), ("task_arithmetic", {"lambda": 0.7}, "torch"),
    ("weight_average", {}, "numpy"), ("weight_average", {}, "torch"),
    ("ties", {"density": 0.4, "trim_scope": "tensor"}, "numpy"),
    ("ties", {"density": 0.4, "trim_scope": "tensor"}, "torch"),
    ("slerp", {"t": 0.3}, "torch"),
])
def test_stacked_slices_equal_the_plain_merges_of_their_inputs(tmp_path, method, params, engine):
    """By construction: a spec stacking layer 2 of (base, e0, e1) then layers 0-1 of (base, e1, e2) writes,
    tensor for tensor, the plain merge of (base, e0, e1) at layer 2 then that of (base, e1, e2) at layers
    0-1; embeddings from the first slice's merge, final norm and head from the last's; integer tensors
    copied from the slice's reference. Both engines stream it."""
    base = save_state_dict(_layered(0), tmp_path / "base.safetensors")
    experts = [save_state_dict({k: (v.float() + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(9 + i))
                                    ).bfloat16() if v.is_floating_point() else v + 10 * (i + 1)
                                for k, v in _layered(0).items()}, tmp_path / f"e{i}.safetensors") for i in range(3)]
    weights = [1.0, 0.5, 2.0] if method != "slerp" else [1.0, 1.0, 1.0]
    pairs = [(0, 1), (1, 2)] if method != "slerp" else [(0,), (1,)]
    used = sorted({i for p in pairs for i in p})

    def entries(idx):
        return [{"path": str(experts[i]), "weight": weights[i]} for i in idx]

    first = [2 if i in pairs[0] else None for i in used]
    second = [0 if i in pairs[1] else None for i in used]
    stacked = {"method": method, "base": str(base), "models": entries(used), "parameters": params,
               "slices": [{"layers": 1, "base_layer": 2, "model_layers": first},
                          {"layers": 2, "base_layer": 0, "model_layers": second}]}
    merge(stacked, tmp_path / "stacked", progress=False, engine=engine)
    for k, idx in enumerate(pairs):
        merge({"method": method, "base": str(base), "models": entries(idx), "parameters": params},
              tmp_path / f"plain{k}", progress=False, engine=engine)
    with open_checkpoint(tmp_path / "stacked") as out, open_checkpoint(tmp_path / "plain0") as p0, \
            open_checkpoint(tmp_path / "plain1") as p1:
        expect = {"model.embed_tokens.weight": p0.get("model.embed_tokens.weight"),
                  "model.norm.weight": p1.get("model.norm.weight"), "lm_head.weight": p1.get("lm_head.weight")}
        for o, (plain, i) in enumerate([(p0, 2), (p1, 0), (p1, 1)]):
            for n in ("self_attn.q.weight", "mlp.up.weight", "position"):
                expect[f"model.layers.{o}.{n}"] = plain.get(f"model.layers.{i}.{n}")
        assert sorted(out.keys()) == sorted(expect)
        for name, tensor in expect.items():
            assert torch.equal(out.get(name), tensor), name
