"""The theory quantities of each expert's task measured at the pretrained backbone theta_0.

For expert ``i``, on ``samples_per_task`` seeded samples of its own *training* subset ``S_i`` (the
``data_ratio`` subset its sidecar's spec names): ``F_{S_i}(theta_0)``, the per-sample gradient variance
``sigma_i^2 = tr(Sigma_i)`` and the mean gradient ``grad F_i`` over the backbone parameters, and ``L_i`` (power
iteration on Hessian-vector products). Each task is seen the way its fine-tuning started: the backbone's
BatchNorm statistics are re-estimated on the task's training images and the loss goes through the **initial
head** computed by fine-tuning's own :func:`mergelab.training.finetuning.initial_head` (``heads="init"``), or
through the expert's final head (``heads="expert"``). Pool quantities (:func:`pool_measurement`):
``L = max_i L_i``, ``delta_i^2 = ||grad F_i - grad F||^2`` with ``F = sum_i (n_i/n) F_i``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

from mergelab.analysis.estimators import (
    PoolMeasurement,
    PowerIterationResult,
    TaskMeasurement,
    gradient_heterogeneity,
    measure_tasks,
)
from mergelab.analysis.noise_scale import NoiseScaleReport, effective_noise_scale, measured_noise_scale
from mergelab.analysis.pool_experts import expert_training_data, task_samples
from mergelab.evaluation.bn import reset_bn_statistics
from mergelab.models import Classifier, build_backbone, load_backbone_state, load_head
from mergelab.models.device import default_device
from mergelab.training.finetuning import BN_ADAPT_BATCH, BN_ADAPT_BATCHES, initial_head

if TYPE_CHECKING:  # pragma: no cover
    from mergelab.training.result import ExpertResult


@dataclass
class ExpertAtInit:
    """One expert's task measured at theta_0 (module docstring): the theory quantities (``measured``, a
    :class:`~mergelab.analysis.estimators.TaskMeasurement` named by the expert's label: ``n`` its training-set
    size ``n_i``, ``n_used`` the samples measured, ``F_{S_i}(theta_0)``, ``sigma_i^2``, ``||grad F_i||^2``, the
    power iteration for ``L_i``, and ``grad F_{S_i}(theta_0)`` over the backbone parameters, float64 and flat,
    kept for the pool's heterogeneity), which expert it is, its noise scale and how it was measured.
    """

    measured: TaskMeasurement
    task: str
    path: str
    spec_hash: str
    noise_sidecar: NoiseScaleReport | None = None
    noise_measured: NoiseScaleReport | None = None
    heads: str = "init"
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return self.measured.name

    @property
    def L(self) -> float:
        sm = self.measured.smoothness
        return float("nan") if sm is None else sm.spectral_norm

    def with_n(self, n: int) -> ExpertAtInit:
        """The same measurement for a training set of ``n`` examples (the theta_0 statistics do not depend on it)."""
        return replace(self, measured=replace(self.measured, n=n))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (without the gradient)."""
        m = self.measured
        return {
            "label": m.name, "task": self.task, "path": self.path, "spec_hash": self.spec_hash, "n": m.n,
            "n_used": m.n_used, "init_loss": m.init_loss, "sigma2": m.sigma2,
            "grad_norm2": m.grad_norm2, "L": self.L,
            "smoothness": None if m.smoothness is None else m.smoothness.to_dict(),
            "noise_scale_sidecar": None if self.noise_sidecar is None else self.noise_sidecar.to_dict(),
            "noise_scale_measured": None if self.noise_measured is None else self.noise_measured.to_dict(),
            "heads": self.heads, "seconds": self.seconds,
        }

    def to_record(self) -> dict[str, Any]:
        """Everything, gradient included, for ``torch.save`` (a per-expert measurement cache)."""
        return {**self.to_dict(), "grad": self.measured.grad}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> ExpertAtInit:
        sm = rec.get("smoothness")
        smooth = None if sm is None else PowerIterationResult(
            sm["eigenvalue"], tuple(sm["trace"]), sm["iterations"], sm["converged"], sm["residual"], sm["tol"])

        def noise(d: Mapping[str, Any] | None) -> NoiseScaleReport | None:
            return None if d is None else NoiseScaleReport(**dict(d))

        measured = TaskMeasurement(rec["label"], int(rec["n"]), int(rec["n_used"]), float(rec["init_loss"]),
                                   float(rec["sigma2"]), float(rec["grad_norm2"]), smooth, rec["grad"])
        return cls(measured, rec["task"], rec["path"], rec["spec_hash"], noise(rec.get("noise_scale_sidecar")),
                   noise(rec.get("noise_scale_measured")), rec.get("heads", "init"), float(rec.get("seconds", 0.0)))


def initial_model(base_state: Mapping[str, torch.Tensor], expert: ExpertResult, heads: str = "init",
                  train_data: Any = None) -> tuple[torch.nn.Module, torch.nn.Linear, Any]:
    """``(backbone at theta_0 with the task's BN statistics, head, training subset)`` for ``expert``.

    ``heads="init"`` recomputes the head fine-tuning started from with fine-tuning's own
    :func:`mergelab.training.finetuning.initial_head` (BN statistics re-estimated on the training subset, then
    the linear probe; the task's frozen shared head; or the seeded zero/random head). ``heads="expert"`` loads
    the expert's final head (the BN statistics are re-estimated the same way).
    """
    data = train_data if train_data is not None else expert_training_data(expert)
    backbone = build_backbone(expert.arch)
    load_backbone_state(backbone, base_state, source="base (theta_0)")
    if heads == "init":
        head = initial_head(expert.spec, backbone, data.x_train, data.y_train, data.num_classes)
        if expert.spec.head_init != "probe":  # probe init already adapted BN; do it for the others too
            reset_bn_statistics(backbone, data.x_train, batch_size=BN_ADAPT_BATCH, num_batches=BN_ADAPT_BATCHES)
    else:
        reset_bn_statistics(backbone, data.x_train, batch_size=BN_ADAPT_BATCH, num_batches=BN_ADAPT_BATCHES)
        head = load_head(expert.head_path, backbone.feature_dim)
    return backbone.eval(), head.eval(), data


def measure_expert_at_init(
    base_state: Mapping[str, torch.Tensor],
    expert: ExpertResult,
    *,
    label: str | None = None,
    samples: int = 100,
    seed: int = 0,
    heads: Literal["init", "expert"] = "init",
    hessian_iters: int = 10,
    hessian_tol: float = 1e-2,
    chunk_size: int = 64,
    noise: bool = True,
    device: str | torch.device | None = None,
) -> ExpertAtInit:
    """Measure ``F_{S_i}(theta_0)``, ``sigma_i^2``, ``grad F_i``, ``L_i`` and the noise scale of one expert.

    ``samples`` seeded samples (:func:`task_samples` with ``seed``) of the expert's training subset; gradients
    over the backbone parameters in eval mode (:func:`mergelab.analysis.estimators.measure_tasks`, with the
    BN statistics already adapted by :func:`initial_model`); ``L_i`` by ``hessian_iters`` power iterations on
    one batch of all the samples (0: skipped); the measured noise scale over all parameters (backbone and
    head) at theta_0 (:func:`~mergelab.analysis.noise_scale.measured_noise_scale`).
    """
    t0 = time.perf_counter()
    dev = default_device(device)
    backbone, head, data = initial_model(base_state, expert, heads)
    backbone.to(dev)
    head.to(dev)
    x, y = task_samples(expert.task, "train", samples, seed, data)
    name = label or expert.task
    m = measure_tasks(
        backbone, [head], [(x, y)], [name], n=[expert.n_train], adapt_bn=False, max_samples=None,
        chunk_size=chunk_size, hessian=hessian_iters > 0, hessian_batch_size=len(x),
        hessian_iters=max(hessian_iters, 1), hessian_tol=hessian_tol, seed=seed,
    )
    t = m.tasks[0]
    sidecar = effective_noise_scale(expert)
    measured = None
    if noise:
        measured = measured_noise_scale(expert, Classifier(backbone, head), x, y, max_samples=None, seed=seed)
    return ExpertAtInit(
        replace(t, n=int(expert.n_train), grad=t.grad.detach().double().cpu()), task=expert.task,
        path=str(expert.path), spec_hash=expert.spec_hash, noise_sidecar=sidecar, noise_measured=measured,
        heads=heads, seconds=time.perf_counter() - t0,
    )


def pool_measurement(inits: Sequence[ExpertAtInit], settings: Mapping[str, Any] | None = None) -> PoolMeasurement:
    """A :class:`~mergelab.analysis.estimators.PoolMeasurement` from per-expert measurements: heterogeneity
    ``delta_i^2`` weighted by the training-set sizes ``n_i`` and ``L = max_i L_i``."""
    if not inits:
        raise ValueError("pool_measurement needs at least one expert")
    tasks = tuple(i.measured for i in inits)
    het = gradient_heterogeneity([t.grad for t in tasks], [t.n for t in tasks])
    lmax = max((i.L for i in inits if i.measured.smoothness is not None), default=float("nan"))
    return PoolMeasurement(tasks, het, lmax, (), dict(settings or {}))
