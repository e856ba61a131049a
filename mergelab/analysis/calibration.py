"""Calibrating the *(derived)* bound's two scale constants against measured merged-model losses.

Model (:mod:`mergelab.analysis.bound`): ``predicted_j = c_opt * opt_j + c_stab * gen_j`` for pool ``j``, with
``opt_j`` and ``gen_j`` the bound's terms at unit constants (optionally ``+ floor``, an irreducible loss
``F* >= 0``: the bound is on the *excess* risk while the measured quantity is a loss).

Fitting methods (``method=``):

* ``"nnls"`` (default): ``min ||A c - y||^2`` subject to ``c >= 0`` with ``A = [opt, gen(, 1)]``
  (``scipy.optimize.nnls``). The prediction is linear in the constants and scale constants of upper-bound
  terms cannot be negative, so this is the exact constrained least-squares optimum, with no starting point
  and no local minima. Absolute errors: pools with large losses (collapsed merges) weigh most.
* ``"relative"``: the same NNLS on rows divided by ``y_j``, i.e. ``min sum_j ((pred_j - y_j) / y_j)^2``: every
  pool counts equally whatever its loss scale; still linear and exact. Preferable when measured losses span
  orders of magnitude.
* ``"log"``: ``min sum_j (log pred_j - log y_j)^2`` over ``log c`` (``scipy.optimize.least_squares``, started
  from the ``"relative"`` solution): a multiplicative-noise model, scale-free like ``"relative"``, but
  nonlinear (a local optimiser) and a constant can only approach 0, never reach it.

Held-out evaluation: the Spearman rank correlation (``scipy.stats.spearmanr``) between the calibrated bound and
the measured loss on pools not used for fitting -- whether the bound *orders* merges correctly, which is what a
mergeability predictor is for. The uncalibrated bound's Spearman is reported alongside as a baseline.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy import optimize, stats

from mergelab.analysis.bound import FORM, BoundConstants, BoundPool, evaluate_bound

log = logging.getLogger(__name__)

Method = Literal["nnls", "relative", "log"]

__all__ = [
    "CalibrationResult",
    "bound_features",
    "calibrate",
    "fit_constants",
    "predict_losses",
    "split_indices",
]


def bound_features(pools: Sequence[BoundPool], train_losses: Sequence[float | None] | None = None,
                   *, heavy_ball: bool = True) -> np.ndarray:
    """``[m, 2]`` matrix of the bound's terms ``(opt, gen)`` at unit constants, one row per pool.

    ``train_losses[j]`` (optional) is pool ``j``'s measured merged training loss for the generalisation term.
    """
    rows = []
    for j, pool in enumerate(pools):
        tl = None if train_losses is None else train_losses[j]
        r = evaluate_bound(pool, BoundConstants(), train_loss=tl, heavy_ball=heavy_ball)
        rows.append((r.opt, r.gen))
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), 2)


def _design(features: np.ndarray, floor: bool) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != 2:
        raise ValueError(f"features must be [m, 2] (opt, gen), got {f.shape}")
    return np.hstack([f, np.ones((len(f), 1))]) if floor else f


def fit_constants(features: np.ndarray, measured: Sequence[float], *, method: Method = "nnls",
                  floor: bool = False) -> tuple[BoundConstants, float]:
    """``(constants, floor)`` fitted to ``measured`` losses (module docstring for the methods)."""
    A = _design(features, floor)
    y = np.asarray(measured, dtype=np.float64)
    if len(y) != len(A):
        raise ValueError(f"{len(A)} pools but {len(y)} measured losses")
    if len(y) < A.shape[1]:
        raise ValueError(f"need at least {A.shape[1]} pools to fit {A.shape[1]} constants, got {len(y)}")
    if not np.all(np.isfinite(A)) or not np.all(np.isfinite(y)):
        raise ValueError("features and measured losses must be finite")
    if method in ("relative", "log") and np.any(y <= 0):
        raise ValueError(f"method {method!r} needs positive measured losses")
    if method == "nnls":
        c, _ = optimize.nnls(A, y)
    elif method in ("relative", "log"):
        c, _ = optimize.nnls(A / y[:, None], np.ones_like(y))
        if method == "log":
            start = np.log(np.maximum(c, 1e-8 * max(float(c.max()), 1e-12)))

            def resid(logc: np.ndarray) -> np.ndarray:
                return np.log(np.maximum(A @ np.exp(logc), 1e-300)) - np.log(y)

            c = np.exp(optimize.least_squares(resid, start, method="trf").x)
    else:
        raise ValueError(f"unknown method {method!r}; known: nnls, relative, log")
    return BoundConstants(c_opt=float(c[0]), c_stab=float(c[1])), float(c[2]) if floor else 0.0


def predict_losses(features: np.ndarray, constants: BoundConstants, floor: float = 0.0) -> np.ndarray:
    """``c_opt * opt + c_stab * gen + floor`` for each row of ``features`` *(derived)*."""
    f = np.asarray(features, dtype=np.float64)
    return constants.c_opt * f[:, 0] + constants.c_stab * f[:, 1] + floor


def split_indices(m: int, test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of ``m`` pools into ``(train, test)`` indices (at least 2 fit, at least 1 held out)."""
    if m < 3:
        raise ValueError("need at least 3 pools to split")
    k = min(m - 2, max(1, int(round(test_fraction * m))))
    perm = np.random.default_rng(seed).permutation(m)
    return np.sort(perm[k:]), np.sort(perm[:k])


def _spearman(pred: np.ndarray, meas: np.ndarray) -> tuple[float, float]:
    if len(pred) < 3 or np.ptp(pred) == 0 or np.ptp(meas) == 0:
        return math.nan, math.nan
    res = stats.spearmanr(pred, meas)
    return float(res.statistic), float(res.pvalue)


@dataclass(frozen=True)
class CalibrationResult:
    """Fitted constants and fit quality *(derived bound)*; ``to_dict()`` has ``"form": "derived"``.

    ``train_*`` on the fitting pools; ``test_*`` on held-out pools (``None`` when none were given):
    ``test_spearman`` of the calibrated bound, ``test_spearman_raw`` of the uncalibrated one (unit constants).
    """

    constants: BoundConstants
    floor: float
    method: str
    n_train: int
    train_rmse: float
    train_mean_rel_error: float
    train_spearman: float
    n_test: int
    test_spearman: float | None
    test_pvalue: float | None
    test_spearman_raw: float | None
    test_rmse: float | None
    test_predicted: tuple[float, ...]
    test_measured: tuple[float, ...]
    form: str = FORM

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["constants"] = asdict(self.constants)
        return d


def calibrate(
    train_pools: Sequence[BoundPool],
    train_measured: Sequence[float],
    test_pools: Sequence[BoundPool] | None = None,
    test_measured: Sequence[float] | None = None,
    *,
    method: Method = "nnls",
    floor: bool = False,
    train_losses: Sequence[float | None] | None = None,
    test_train_losses: Sequence[float | None] | None = None,
    heavy_ball: bool = True,
) -> CalibrationResult:
    """Fit ``c_opt``, ``c_stab`` (and optionally the floor) on ``train_pools`` and score held-out ``test_pools``.

    ``*_measured`` are the measured merged-model losses (e.g. mean test cross-entropy over the pool's tasks);
    ``train_losses``/``test_train_losses`` optional measured merged training losses for the generalisation term.
    """
    ftr = bound_features(train_pools, train_losses, heavy_ball=heavy_ball)
    ytr = np.asarray(train_measured, dtype=np.float64)
    consts, fl = fit_constants(ftr, ytr, method=method, floor=floor)
    ptr = predict_losses(ftr, consts, fl)
    rel = np.abs(ptr - ytr) / np.where(ytr != 0, np.abs(ytr), 1.0)
    tr_rho, _ = _spearman(ptr, ytr)
    n_test = 0
    t_rho = t_p = t_raw = t_rmse = None
    pte: np.ndarray = np.zeros(0)
    yte: np.ndarray = np.zeros(0)
    if test_pools is not None:
        if test_measured is None or len(test_measured) != len(test_pools):
            raise ValueError("test_measured must hold one loss per test pool")
        fte = bound_features(test_pools, test_train_losses, heavy_ball=heavy_ball)
        yte = np.asarray(test_measured, dtype=np.float64)
        pte = predict_losses(fte, consts, fl)
        n_test = len(yte)
        t_rho, t_p = _spearman(pte, yte)
        t_raw, _ = _spearman(fte.sum(1), yte)
        t_rmse = float(np.sqrt(np.mean((pte - yte) ** 2)))
        if n_test < 3:
            log.warning("Spearman on %d held-out pools is undefined; hold out at least 3", n_test)
    log.info("(derived bound) calibrated c_opt=%.4g c_stab=%.4g floor=%.4g by %s; held-out Spearman %s",
             consts.c_opt, consts.c_stab, fl, method, t_rho)
    return CalibrationResult(
        constants=consts,
        floor=fl,
        method=method,
        n_train=len(ytr),
        train_rmse=float(np.sqrt(np.mean((ptr - ytr) ** 2))),
        train_mean_rel_error=float(rel.mean()),
        train_spearman=tr_rho,
        n_test=n_test,
        test_spearman=t_rho,
        test_pvalue=t_p,
        test_spearman_raw=t_raw,
        test_rmse=t_rmse,
        test_predicted=tuple(float(v) for v in pte),
        test_measured=tuple(float(v) for v in yte),
    )
