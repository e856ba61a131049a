"""TSV-Merge, Iso-C and Iso-CTS (mergelab.ops.spectral, catalog entries tsv_merge / iso_c / iso_cts) against
closed forms on hand-built matrices (orthonormal singular vectors chosen by construction), against a float64
transcription of the published algorithms (zero-padded slots, thin SVDs, ``P Q^T``) on full-rank random
tasks, and on the edge cases: 1-D and other non-matrix tensors, convolutions, zero task vectors, rank-deficient
and duplicate tasks, r < T."""

from __future__ import annotations

import math

import pytest
import torch

from mergelab import ops
from mergelab.errors import SpecError
from mergelab.merging.torch_backend import kernel
from mergelab.methods import TensorInputs, get_method

F64 = torch.float64
SPECTRAL = ("tsv_merge", "iso_c", "iso_cts")


pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one intra-op thread (conftest)


def run(name: str, base, experts, weights=None, params=None, *, dtype=F64, tensor="layer.weight", out_dtype=None):
    method = get_method(name)
    weights = [1.0] * len(experts) if weights is None else weights
    p = method.parse_params(params or {})
    return kernel(method)(TensorInputs(tensor, base, experts, weights, compute_dtype=dtype, out_dtype=out_dtype), p)


def orthonormal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q


def from_components(q: torch.Tensor, r: torch.Tensor, values: dict[int, float]) -> torch.Tensor:
    """sum_j values[j] q_j r_j^T (q_j, r_j columns of the orthonormal q, r)."""
    out = torch.zeros(q.shape[0], r.shape[0], dtype=F64)
    for j, s in values.items():
        out += s * torch.outer(q[:, j], r[:, j])
    return out


def inv_sqrt_psd(g: torch.Tensor) -> torch.Tensor:
    """G^{-1/2} of a symmetric positive definite G by its eigendecomposition (not an SVD)."""
    w, v = torch.linalg.eigh(g)
    return (v / w.sqrt()) @ v.T


def polar_by_gram(x: torch.Tensor) -> torch.Tensor:
    """x (x^T x)^{-1/2}: the orthonormal factor of a full-column-rank x, through its Gram matrix."""
    return x @ inv_sqrt_psd(x.T @ x)


# --------------------------------------------------------------- literal float64 transcriptions of the papers


def paper_tsv(taus: list[torch.Tensor]) -> torch.Tensor:
    """Gargiulo et al.'s TSV-M as published: r slots, task i's k = floor(r / T) leading components in slots
    i k .. (i + 1) k (the rest zero), thin SVDs of the slot matrices, U_perp = P Q^T, V_perp likewise."""
    t = len(taus)
    u0, s0, vh0 = torch.linalg.svd(taus[0], full_matrices=False)
    su, ss, svh = torch.zeros_like(u0), torch.zeros_like(s0), torch.zeros_like(vh0)
    k = s0.numel() // t
    for i, tau in enumerate(taus):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        su[:, i * k:(i + 1) * k], ss[i * k:(i + 1) * k], svh[i * k:(i + 1) * k] = u[:, :k], s[:k], vh[:k]
    pu, _, qu = torch.linalg.svd(su, full_matrices=False)
    pv, _, qv = torch.linalg.svd(svh, full_matrices=False)
    return (pu @ qu) @ torch.diag(ss) @ (pv @ qv)


def paper_iso_c(taus: list[torch.Tensor]) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    return s.mean() * u @ vh


def paper_iso_cts(taus: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """Marczak et al.'s Iso-CTS as published: common top-c of the sum, d per task from the residuals, all
    in r slots (task-specific first, common last), P Q^T of both sides, the mean singular value."""
    t = len(taus)
    r = min(taus[0].shape)
    c = int(r * fraction)
    c = r - round((r - c) / t) * t
    d = (r - c) // t
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    uc, sc, vhc = u[:, :c], s[:c], vh[:c]
    su, ss, svh = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
    for i, tau in enumerate(taus):
        ur, sr, vhr = torch.linalg.svd(tau - uc @ uc.T @ tau, full_matrices=False)
        su[:, i * d:(i + 1) * d], ss[i * d:(i + 1) * d], svh[i * d:(i + 1) * d] = ur[:, :d], sr[:d], vhr[:d]
    su[:, t * d:], ss[t * d:], svh[t * d:] = uc, sc, vhc
    pu, _, qu = torch.linalg.svd(su, full_matrices=False)
    pv, _, qv = torch.linalg.svd(svh, full_matrices=False)
    return ss.mean() * (pu @ qu) @ (pv @ qv)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a.to(F64), b.to(F64), rtol=tol, atol=tol), (a.to(F64) - b.to(F64)).abs().max()


def random_tasks(n: int, shape, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=F64)
    return base, [base + scale * torch.randn(shape, generator=g, dtype=F64) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ TSV-Merge


@pytest.mark.parametrize("ranks", [(2, 2, 2, 2), (1, 2, 1, 0)])
def test_tsv_on_orthogonal_task_subspaces_is_task_arithmetic(ranks):
    """Tasks on mutually orthogonal singular vectors, each of rank <= k = floor(8 / 4) = 2: the concatenated
    vectors are already orthonormal, so TSV-Merge is the plain sum, lambda sum_i w_i tau_i."""
    q, r = orthonormal(8, 1), orthonormal(8, 2)
    base = torch.randn(8, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    taus = [from_components(q, r, {2 * i + j: 3.0 - j + 0.5 * i for j in range(rk)}) for i, rk in enumerate(ranks)]
    weights = [1.0, 0.5, 2.0, -1.0]
    out = run("tsv_merge", base, [base + t for t in taus], weights, {"lambda": 0.7})
    close(out, base + 0.7 * sum(w * t for w, t in zip(weights, taus)))


def test_tsv_rank_one_tasks_closed_form():
    """Rank-1 tasks s_i u_i v_i^T with non-orthogonal unit u_i, v_i (k = 2 >= 1): TSV-Merge is
    U (U^T U)^{-1/2} diag(s) (V (V^T V)^{-1/2})^T with U = [u_1 u_2 u_3], computed through Gram matrices."""
    g = torch.Generator().manual_seed(5)
    us = [v / v.norm() for v in torch.randn(3, 7, generator=g, dtype=F64)]
    vs = [v / v.norm() for v in torch.randn(3, 6, generator=g, dtype=F64)]
    s = [4.0, 2.5, 1.0]
    base = torch.zeros(7, 6, dtype=F64)
    out = run("tsv_merge", base, [si * torch.outer(u, v) for si, u, v in zip(s, us, vs)])
    u_perp, v_perp = polar_by_gram(torch.stack(us, 1)), polar_by_gram(torch.stack(vs, 1))
    close(out, u_perp @ torch.diag(torch.tensor(s, dtype=F64)) @ v_perp.T)
    assert (out - sum(si * torch.outer(u, v) for si, u, v in zip(s, us, vs))).norm() > 0.1  # not TA here


@pytest.mark.parametrize(("shape", "n"), [((7, 9), 3), ((12, 5), 2), ((6, 6), 4), ((9, 7), 1)])
def test_tsv_full_rank_tasks_equal_the_published_algorithm(shape, n):
    """Full-rank random tasks (r not always a multiple of T: zero slots in the published version): equal to
    the literal transcription, at lambda and with per-model weights scaling the task vectors first."""
    base, experts = random_tasks(n, shape, seed=sum(shape) + n)
    weights = [1.0, 0.5, 2.0, 1.5][:n]
    out = run("tsv_merge", base, experts, weights, {"lambda": 1.3})
    close(out, base + 1.3 * paper_tsv([w * (e - base) for w, e in zip(weights, experts)]))


def test_tsv_fewer_singular_values_than_tasks_gives_the_base():
    """r = 3 < T = 4: k = floor(3 / 4) = 0 components per task, so the matrix's task vector is 0 (as in the
    authors' code)."""
    base, experts = random_tasks(4, (3, 5), seed=2)
    assert torch.equal(run("tsv_merge", base, experts), base)


def test_tsv_drops_the_null_space_of_rank_deficient_tasks():
    """Rank-1 orthogonal tasks with k = 3: the published code would concatenate each task's 2 arbitrary
    null-space vectors (zero singular values) into the orthogonalisation; the numerical rank keeps only the
    real components, so the result is the sum (deterministic)."""
    q, r = orthonormal(6, 7), orthonormal(6, 8)
    taus = [from_components(q, r, {0: 2.0}), from_components(q, r, {1: 1.0})]
    base = torch.zeros(6, 6, dtype=F64)
    close(run("tsv_merge", base, taus), taus[0] + taus[1])


def test_tsv_duplicate_tasks_keep_the_shared_subspace_once():
    """Two identical full-rank tasks (k = 3 of r = 6): the concatenated U = [U_3 U_3] has rank 3; its
    orthonormal factor on that column space is [U_3 U_3] / sqrt(2), so TSV-Merge is the rank-3 truncation of
    tau (each shared direction once, with its singular value), not 2 tau and not arbitrary."""
    base, (expert,) = random_tasks(1, (6, 6), seed=9)
    tau = expert - base
    u, s, vh = torch.linalg.svd(tau)
    close(run("tsv_merge", base, [expert, expert.clone()]), base + u[:, :3] @ torch.diag(s[:3]) @ vh[:3], 1e-8)


# -------------------------------------------------------------------------------------------------- Iso-C


def test_iso_c_flattens_the_spectrum_of_the_sum_to_its_mean():
    """Iso-C = sigma_bar U V^T of the sum Delta: every singular value of the merged task matrix equals the
    mean of Delta's, and its singular vectors are Delta's: Delta (Delta^T Delta)^{-1/2} sigma_bar (by Gram)."""
    base, experts = random_tasks(3, (9, 5), seed=4)
    weights = [1.0, -0.5, 2.0]
    delta = sum(w * (e - base) for w, e in zip(weights, experts))
    sigma_bar = torch.linalg.eigvalsh(delta.T @ delta).sqrt().mean()
    out = run("iso_c", base, experts, weights, {"lambda": 0.4})
    close(out, base + 0.4 * sigma_bar * polar_by_gram(delta))
    close(torch.linalg.svdvals(out - base), torch.full((5,), 0.4 * float(sigma_bar), dtype=F64))
    close(out, base + 0.4 * paper_iso_c([w * (e - base) for w, e in zip(weights, experts)]))


def test_iso_c_on_an_isotropic_sum_is_task_arithmetic():
    """A sum whose singular values are already equal (orthogonal tasks, equal values) is unchanged."""
    q, r = orthonormal(5, 11), orthonormal(5, 12)
    taus = [from_components(q, r, {0: 2.0, 1: 2.0}), from_components(q, r, {2: 2.0, 3: 2.0, 4: 2.0})]
    base = torch.ones(5, 5, dtype=F64)
    close(run("iso_c", base, [base + t for t in taus]), base + taus[0] + taus[1])


def test_iso_c_rank_deficient_sum_averages_over_its_rank():
    """Colinear rank-1 tasks: Delta = 5 u v^T has rank 1, sigma_bar = 5 (mean over the rank), so Iso-C
    returns Delta itself, not Delta / r plus arbitrary null-space directions; cancelling tasks give the base."""
    u, v = orthonormal(4, 1)[:, 0], orthonormal(6, 2)[:, 0]
    base = torch.zeros(4, 6, dtype=F64)
    close(run("iso_c", base, [2.0 * torch.outer(u, v), 3.0 * torch.outer(u, v)]), 5.0 * torch.outer(u, v))
    tau = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.equal(run("iso_c", base, [tau, -tau]), base)


# ------------------------------------------------------------------------------------------------- Iso-CTS


def test_iso_cts_hand_built_common_and_task_specific_subspaces():
    """r = 8, T = 2, fraction 0.5: c = 4, d = 2. On orthonormal directions e_j = q_j r_j^T,
    task 1 = 6 e0 + 5 e1 + 3 e2 + 2 e3 + 1 e4 + 0.7 e6, task 2 = 4 e0 + 4 e1 + 2.5 e5 + 1.5 e6 + 0.5 e7.
    The sum's top 4 are e0 (10), e1 (9), e2 (3), e5 (2.5): the common subspace. Task 1's residual
    2 e3 + 1 e4 + 0.7 e6 keeps e3, e4 (d = 2; e6 at 0.7 is dropped), task 2's is 1.5 e6 + 0.5 e7. All eight
    directions are kept, with sigma_bar = (10 + 9 + 3 + 2.5 + 2 + 1 + 1.5 + 0.5) / 8 = 3.6875; Iso-C's mean is
    the sum's, (10 + 9 + 3 + 2 + 1 + 2.5 + 2.2 + 0.5) / 8 = 3.775."""
    q, r = orthonormal(8, 21), orthonormal(8, 22)
    t1 = from_components(q, r, {0: 6.0, 1: 5.0, 2: 3.0, 3: 2.0, 4: 1.0, 6: 0.7})
    t2 = from_components(q, r, {0: 4.0, 1: 4.0, 5: 2.5, 6: 1.5, 7: 0.5})
    base = torch.zeros(8, 8, dtype=F64)
    assert ops.common_and_specific_sizes(8, 2, 0.5) == (4, 2)
    all_dirs = q @ r.T
    close(run("iso_cts", base, [t1, t2], params={"common_space_fraction": 0.5}), 3.6875 * all_dirs)
    close(run("iso_c", base, [t1, t2]), 3.775 * all_dirs)
    close(run("iso_cts", base, [t1, t2], params={"common_space_fraction": 1.0}), 3.775 * all_dirs)


@pytest.mark.parametrize(("shape", "n", "fraction"), [((10, 12), 3, 0.8), ((16, 9), 4, 0.5), ((8, 8), 2, 0.8),
                                                      ((12, 12), 3, 0.0)])
def test_iso_cts_full_rank_tasks_equal_the_published_algorithm(shape, n, fraction):
    base, experts = random_tasks(n, shape, seed=shape[0] * 7 + n)
    weights = [1.0, 0.5, 2.0, 1.5][:n]
    out = run("iso_cts", base, experts, weights, {"lambda": 0.8, "common_space_fraction": fraction})
    close(out, base + 0.8 * paper_iso_cts([w * (e - base) for w, e in zip(weights, experts)], fraction), 1e-8)
    svals = torch.linalg.svdvals(out - base)
    close(svals, svals[0].expand_as(svals).clone(), 1e-8)  # isotropic


def test_iso_cts_subspace_sizes():
    """The authors' sizes: c = r - T round((r - floor(f r)) / T) with Python's rounding (half to even), d
    capped so that c >= 0."""
    assert ops.common_and_specific_sizes(384, 4, 0.8) == (308, 19)  # floor(307.2) = 307; round(77/4) = 19
    assert ops.common_and_specific_sizes(10, 4, 0.8) == (10, 0)  # round(0.5) = 0
    assert ops.common_and_specific_sizes(12, 3, 0.0) == (0, 4)
    assert ops.common_and_specific_sizes(7, 2, 0.0) == (1, 3)  # round(3.5) = 4 would need 8 > 7 columns
    assert ops.common_and_specific_sizes(3, 4, 0.8) == (3, 0)


def test_iso_cts_zero_and_rank_deficient_tasks():
    base = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert torch.equal(run("iso_cts", base, [base.clone(), base.clone()]), base)
    u, v = orthonormal(6, 3)[:, :2], orthonormal(5, 4)[:, :2]
    t1, t2 = 3.0 * torch.outer(u[:, 0], v[:, 0]), 1.0 * torch.outer(u[:, 1], v[:, 1])
    # sum rank 2 < c = 5 - 2 * round(1 / 2) = 5; residuals zero: sigma_bar over the two real directions
    close(run("iso_cts", base, [base + t1, base + t2]), base + 2.0 * (t1 / 3.0 + t2))


# ----------------------------------------------------------------------------------- tensors that are not matrices


@pytest.mark.parametrize("name", SPECTRAL)
@pytest.mark.parametrize("shape", [(11,), (), (2, 3, 4), (4, 3, 3, 3), (0,), (0, 4)])
def test_non_matrix_tensors_take_the_mean_of_the_task_vectors(name, shape):
    """1-D (biases, norms, BN statistics), 0-D, 3-D and 4-D (convolution) tensors: theta_0 + lambda
    sum_i w_i tau_i / T, as in the authors' code and FusionBench (only len(shape) == 2 is a matrix); an
    empty matrix stays empty."""
    base, experts = random_tasks(3, shape, seed=len(shape))
    weights = [1.0, 0.5, -2.0]
    out = run(name, base, experts, weights, {"lambda": 1.7})
    if len(shape) == 2:
        assert out.shape == shape
        return
    close(out, base + 1.7 * sum(w * (e - base) for w, e in zip(weights, experts)) / 3)


@pytest.mark.parametrize("name", SPECTRAL)
def test_conv_as_matrix_merges_the_reshaped_kernel(name):
    """``conv_as_matrix``: a (out, in, kh, kw) weight is merged as the (out, in kh kw) matrix."""
    base, experts = random_tasks(2, (6, 2, 3, 3), seed=13)
    flat = run(name, base.reshape(6, -1), [e.reshape(6, -1) for e in experts], params={"lambda": 0.5})
    out = run(name, base, experts, params={"lambda": 0.5, "conv_as_matrix": True})
    close(out, flat.reshape(base.shape))
    assert not torch.allclose(out, run(name, base, experts, params={"lambda": 0.5}))


@pytest.mark.parametrize("name", SPECTRAL)
def test_kernels_in_float32_and_bfloat16_output(name):
    """The torch back-end's kernel is the reference on the whole tensor, rounded once into the output dtype;
    float32 compute agrees with float64 to float32 precision."""
    base, experts = random_tasks(3, (24, 16), seed=17, scale=0.05)
    b32, e32 = base.float(), [e.float() for e in experts]
    method = get_method(name)
    p = method.parse_params({"lambda": 0.6})
    inp = TensorInputs("w", b32, e32, [1.0, 0.5, 2.0])
    ref = method.reference(inp, p)
    assert ref.dtype == torch.float32 and torch.equal(kernel(name)(inp, p), ref)
    out_bf16 = kernel(name)(TensorInputs("w", b32, e32, [1.0, 0.5, 2.0], out_dtype=torch.bfloat16), p)
    assert torch.equal(out_bf16, ref.to(torch.bfloat16))
    close(ref, run(name, b32.double(), [e.double() for e in e32], [1.0, 0.5, 2.0], {"lambda": 0.6}), 1e-5)


def test_parameters_and_defaults():
    for name in SPECTRAL:
        p = get_method(name).parse_params({})
        assert (p.lambda_, p.conv_as_matrix) == (1.0, False)
        assert get_method(name).validation_grid["lambda"][0] == 0.1
        assert get_method(name).validation_grid["lambda"][-1] == 3.0
    assert get_method("iso_cts").parse_params({}).common_space_fraction == 0.8
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(SpecError, match="common_space_fraction"):
            get_method("iso_cts").parse_params({"common_space_fraction": bad})
    with pytest.raises(SpecError, match="does not take"):
        get_method("iso_c").parse_params({"common_space_fraction": 0.5})


def test_merge_end_to_end_tensor_by_tensor(tmp_path):
    """mergelab.merge streams a model with a matrix, a convolution, a bias and an integer buffer: each
    output tensor is the method's reference on that tensor (integers copied from the base)."""
    from safetensors.torch import load_file, save_file

    from mergelab.merging import merge

    g = torch.Generator().manual_seed(0)
    shapes = {"fc.weight": (12, 8), "conv.weight": (4, 2, 3, 3), "fc.bias": (12,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    base["bn.num_batches_tracked"] = torch.tensor(5)
    paths = []
    for i, name in enumerate(("base", "a", "b", "c")):
        sd = dict(base) if i == 0 else {k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point()
                                            else v + i) for k, v in base.items()}
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "model.safetensors"))
        paths.append(sd)
    for method, params in [("tsv_merge", {"lambda": 0.8}), ("iso_c", {}),
                           ("iso_cts", {"common_space_fraction": 0.5, "conv_as_matrix": True})]:
        spec = {"method": method, "base": str(tmp_path / "base"), "parameters": params,
                "models": [str(tmp_path / n) for n in ("a", "b", "c")]}
        merge(spec, tmp_path / f"out-{method}", progress=False)
        out = load_file(str(tmp_path / f"out-{method}" / "model.safetensors"))
        m = get_method(method)
        p = m.parse_params(params)
        for k in shapes:
            expected = m.reference(TensorInputs(k, paths[0][k], [sd[k] for sd in paths[1:]], [1.0] * 3), p)
            assert torch.allclose(out[k], expected, atol=1e-6), (method, k)
        assert torch.equal(out["bn.num_batches_tracked"], base["bn.num_batches_tracked"])
