"""Euclidean projection onto the simplex: known cases, feasibility, optimality vs a QP solver and a certificate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mergelab.ops.simplex import project_simplex, project_solid_simplex


def _qp(v: np.ndarray, radius: float, solid: bool) -> np.ndarray:
    """Brute-force reference: min ||x - v||^2 s.t. x >= 0 and sum x = radius (or <= radius), by SLSQP."""
    n = len(v)
    cons = {"type": "ineq" if solid else "eq", "fun": lambda x: radius - x.sum(), "jac": lambda x: -np.ones(n)}
    res = minimize(lambda x: ((x - v) ** 2).sum(), np.full(n, radius / n), jac=lambda x: 2 * (x - v),
                   bounds=[(0, None)] * n, constraints=[cons], method="SLSQP", options={"ftol": 1e-12, "maxiter": 1000})
    x = np.clip(res.x, 0, None)  # SLSQP may end a hair outside the bounds or stop on a flat line search
    return x * radius / x.sum() if not solid or x.sum() > radius else x


@pytest.mark.parametrize(
    ("v", "expected"),
    [
        ([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]),  # already in the simplex: unchanged
        ([1.0, 0.0], [1.0, 0.0]),
        ([2.0, 0.0], [1.0, 0.0]),
        ([0.5, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]),
        ([0.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]),
        ([-1.0, -1.0], [0.5, 0.5]),
        ([3.0, 1.0, -1.0], [1.0, 0.0, 0.0]),
        ([1.0, 0.5, 0.0], [0.75, 0.25, 0.0]),
        ([5.0], [1.0]),
    ],
)
def test_known_projections(v, expected):
    out = project_simplex(torch.tensor(v, dtype=torch.float64))
    assert out.tolist() == pytest.approx(expected, abs=1e-12)


def test_radius_and_solid_known_cases():
    assert project_simplex(torch.tensor([2.0, 0.0]), radius=3.0).tolist() == pytest.approx([2.5, 0.5])
    # solid simplex: points with non-negative entries summing to <= 1 are kept, negatives are clipped
    assert project_solid_simplex(torch.tensor([0.2, 0.3])).tolist() == pytest.approx([0.2, 0.3])
    assert project_solid_simplex(torch.tensor([0.2, -0.3, 0.1])).tolist() == pytest.approx([0.2, 0.0, 0.1])
    assert project_solid_simplex(torch.tensor([-1.0, -2.0])).tolist() == [0.0, 0.0]
    assert project_solid_simplex(torch.tensor([2.0, 0.0])).tolist() == pytest.approx([1.0, 0.0])
    assert project_solid_simplex(torch.tensor([0.5, 0.5, 0.5])).tolist() == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("solid", [False, True])
def test_feasible_and_closest_against_a_qp_solver(solid):
    gen = torch.Generator().manual_seed(0)
    project = project_solid_simplex if solid else project_simplex
    for trial in range(40):
        n = 2 + trial % 7
        radius = [1.0, 0.5, 2.0][trial % 3]
        v = torch.randn(n, generator=gen, dtype=torch.float64) * [0.3, 1.0, 3.0][trial % 3]
        x = project(v, radius)
        assert (x >= 0).all()
        if solid:
            assert float(x.sum()) <= radius + 1e-12
        else:
            assert float(x.sum()) == pytest.approx(radius, abs=1e-12)
        ref = _qp(v.numpy(), radius, solid)
        assert float(((x - v) ** 2).sum()) <= float(((torch.from_numpy(ref) - v) ** 2).sum()) + 1e-9
        assert np.allclose(x.numpy(), ref, atol=1e-5)
        # optimality certificate: <v - x, y - x> <= 0 for every vertex y of the set (polytope => all points)
        vertices = radius * torch.eye(n, dtype=torch.float64)
        if solid:
            vertices = torch.cat([vertices, torch.zeros(1, n, dtype=torch.float64)])
        assert float(((vertices - x) @ (v - x)).max()) <= 1e-12


def test_rows_are_independent_and_dtype_is_kept():
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(5, 3, 4, generator=gen)
    for project in (project_simplex, project_solid_simplex):
        out = project(v)
        assert out.shape == v.shape and out.dtype == torch.float32
        for idx in np.ndindex(5, 3):
            assert torch.allclose(out[idx], project(v[idx]))
    half = project_simplex(torch.tensor([0.7, 0.7], dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16 and half.float().tolist() == pytest.approx([0.5, 0.5])
    v = torch.tensor([0.1, 0.9])
    project_simplex(v)
    assert v.tolist() == pytest.approx([0.1, 0.9])  # input untouched


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="NaN or Inf"):
        project_simplex(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="radius"):
        project_simplex(torch.tensor([1.0]), radius=0.0)
    with pytest.raises(ValueError, match="at least one entry"):
        project_simplex(torch.empty(0))
    with pytest.raises(TypeError, match="floating"):
        project_solid_simplex(torch.tensor([1, 2]))
