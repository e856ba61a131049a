"""Linear centered kernel alignment (CKA) between representations.

For representation matrices ``X [n, d1]`` and ``Y [n, d2]`` of the same ``n`` inputs, with columns centred
(``X <- X - 1 mean(X)``, likewise ``Y``), linear CKA is (Kornblith et al. 2019, "Similarity of neural
network representations revisited", eq. for linear HSIC; THEORY.md section 2)::

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)

It lies in ``[0, 1]``, equals 1 for ``Y = X``, and is invariant to orthogonal transforms ``X -> X Q`` and
isotropic scaling ``X -> c X`` of either argument (not to general invertible linear maps). All arithmetic is
in float64. For ``d > n`` the Gram form ``<K_X, K_Y>_F / (||K_X||_F ||K_Y||_F)`` with ``K = X X^T`` is the
same number and cheaper; :func:`linear_cka` picks the cheaper form.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from mergelab.errors import SpecError

logger = logging.getLogger(__name__)


def _centred(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 2:
        raise SpecError(f"{name} must be a 2-D [n, d] matrix, got shape {tuple(x.shape)}")
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise SpecError(f"{name} contains NaN or Inf values")
    return x - x.mean(dim=0, keepdim=True)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` of column-centred ``x [n, d1]``, ``y [n, d2]``.

    Returns ``nan`` when either centred representation is identically zero (CKA undefined); raises
    :class:`SpecError` for mismatched row counts, non-2-D inputs or non-finite values.
    """
    xc, yc = _centred(x, "x"), _centred(y, "y")
    n = xc.shape[0]
    if yc.shape[0] != n:
        raise SpecError(f"x and y must describe the same inputs: {n} vs {yc.shape[0]} rows")
    if n < 2:
        raise SpecError("linear CKA needs at least two inputs")
    if min(xc.shape[1], yc.shape[1]) > n:  # Gram (n x n) form, identical value
        kx, ky = xc @ xc.T, yc @ yc.T
        num = float((kx * ky).sum())
        den = float(torch.linalg.norm(kx) * torch.linalg.norm(ky))
    else:
        num = float(torch.linalg.norm(yc.T @ xc) ** 2)
        den = float(torch.linalg.norm(xc.T @ xc) * torch.linalg.norm(yc.T @ yc))
    if den == 0.0:
        logger.warning("linear CKA undefined: a representation is constant over the inputs")
        return float("nan")
    return num / den


def _feature_module(model: nn.Module) -> nn.Module:
    """The penultimate-feature extractor: ``model.backbone`` if present (a :class:`Classifier`), else the model."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else model


@torch.no_grad()
def features(
    model: nn.Module, x: torch.Tensor, batch_size: int = 512, device: torch.device | str | None = None
) -> torch.Tensor:
    """Penultimate features ``[n, d]`` (float64, CPU) of ``x``: the backbone output, in eval mode, no gradients.

    Outputs with more than two dimensions are flattened per input.
    """
    module = _feature_module(model)
    if device is None:
        p = next(iter(module.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = module.training
    module.eval()
    try:
        out = [
            module(x[i : i + batch_size].to(device)).flatten(1).double().cpu() for i in range(0, len(x), batch_size)
        ]
    finally:
        module.train(was_training)
    if not out:
        raise SpecError("features: empty input batch")
    return torch.cat(out)


def model_cka(
    model_a: nn.Module,
    model_b: nn.Module,
    x: torch.Tensor,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> float:
    """Linear CKA between the penultimate features of two models on the same fixed inputs ``x``.

    The features are each model's backbone output (``model.backbone(x)`` for a ``Classifier``, else
    ``model(x)``), computed in eval mode (BatchNorm running statistics). Use a fixed batch (e.g. the first
    512 test images of a task) so values are comparable across pairs.
    """
    return linear_cka(features(model_a, x, batch_size, device), features(model_b, x, batch_size, device))


__all__ = ["features", "linear_cka", "model_cka"]
