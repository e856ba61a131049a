"""Linear probes: a task head fitted on frozen backbone features.

``fit_linear_probe`` minimises the L2-regularised multinomial logistic loss

    mean_i CE(W z_i + b, y_i) + (l2 / 2) ||W||_F^2,   z_i = (f_i - mu) / sd

over standardised features (mu, sd: per-feature mean and standard deviation of the training features) by
full-batch L-BFGS from zero, then folds the standardisation into the returned head:
``W' = W / sd``, ``b' = b - W' mu``. The fit is deterministic (no seed), so every expert of a task with the
same pretrained backbone and training subset starts from the same head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(
    backbone: nn.Module, x: torch.Tensor, batch_size: int = 512, device: torch.device | None = None
) -> torch.Tensor:
    """Penultimate features ``[N, feature_dim]`` (float32, CPU) of ``x`` with the backbone in eval mode."""
    device = device or next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    out = [backbone(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    backbone.train(was_training)
    return torch.cat(out) if out else torch.empty(0, getattr(backbone, "feature_dim", 0))


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    l2: float = 1e-3,
    max_iter: int = 200,
) -> nn.Linear:
    """A head ``nn.Linear(feature_dim, num_classes)`` fitted by L-BFGS (see the module docstring).

    Args:
        features: ``[N, F]`` frozen features. labels: ``[N]`` int64 in ``[0, num_classes)``.
        l2: ridge strength on the standardised weights (default 1e-3). max_iter: L-BFGS iterations.
    """
    f = features.detach().double().cpu()
    y = labels.detach().long().cpu()
    mu = f.mean(0)
    sd = f.std(0, unbiased=False).clamp_min(1e-6)
    z = (f - mu) / sd
    w = torch.zeros(num_classes, f.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    head = nn.Linear(f.shape[1], num_classes)
    with torch.no_grad():
        w_fold = w.detach() / sd
        head.weight.copy_(w_fold.float())
        head.bias.copy_((b.detach() - w_fold @ mu).float())
    return head
