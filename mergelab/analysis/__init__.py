"""Mergeability analysis: data-free pool diagnostics and the mergeability report.

- :func:`pool_diagnostics` (:mod:`mergelab.analysis.diagnostics`): streamed, per-layer and whole-model
  task-vector norms, cosines, sign conflicts, dispersion, and each operator's dispersion reduction Delta_T
  (Corollary 1 of THEORY.md, section 1);
- :class:`Report`, :func:`write_report` (:mod:`mergelab.analysis.diagnostics_report`): the diagnostics
  sections of the one report document (:mod:`mergelab.report.folder`: report.json + report.md + PNG plots),
  built from sections so further analyses can add theirs.

- landscape tools (:mod:`~mergelab.analysis.landscape`: interpolation, barriers, task-arithmetic path, 2-D
  plane), permutation alignment (:mod:`~mergelab.analysis.alignment`: weight matching), linear CKA
  (:mod:`~mergelab.analysis.cka`);
- theory quantities (:mod:`~mergelab.analysis.estimators`: smoothness, gradient variance, heterogeneity;
  :mod:`~mergelab.analysis.noise_scale`; :mod:`~mergelab.analysis.effective_lr`), the *(derived)* stability
  bound (:mod:`~mergelab.analysis.bound`), its predictions (:mod:`~mergelab.analysis.bound_predictions`) and
  excess-loss form (:mod:`~mergelab.analysis.excess_bound`), and its calibration
  (:mod:`~mergelab.analysis.calibration`).

Names here are imported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "DiagnosticsConfig": "mergelab.analysis.diagnostics",
    "LayerDiagnostics": "mergelab.analysis.diagnostics",
    "OPERATORS": "mergelab.analysis.diagnostics",
    "PoolDiagnostics": "mergelab.analysis.diagnostics",
    "PoolStats": "mergelab.analysis.diagnostics",
    "apply_operator": "mergelab.analysis.diagnostics",
    "coordinate_dispersion": "mergelab.analysis.diagnostics",
    "expected_ranking": "mergelab.analysis.diagnostics",
    "pool_diagnostics": "mergelab.analysis.diagnostics",
    "sign_consensus": "mergelab.analysis.diagnostics",
    "tensor_stats": "mergelab.analysis.diagnostics",
    "Report": "mergelab.report.folder",
    "Drawing": "mergelab.report.folder",
    "diagnostics_report": "mergelab.analysis.diagnostics_report",
    "write_report": "mergelab.analysis.diagnostics_report",
    "linear_interpolation": "mergelab.analysis.landscape",
    "task_arithmetic_path": "mergelab.analysis.landscape",
    "loss_plane": "mergelab.analysis.landscape",
    "merge_gain": "mergelab.analysis.landscape",
    "EvalTask": "mergelab.analysis.landscape",
    "evaluate_module": "mergelab.analysis.landscape",
    "default_accuracy": "mergelab.analysis.landscape",
    "combine_states": "mergelab.analysis.landscape",
    "interpolate_states": "mergelab.analysis.landscape",
    "task_arithmetic_state": "mergelab.analysis.landscape",
    "barrier_height": "mergelab.analysis.landscape",
    "midpoint_gain": "mergelab.analysis.landscape",
    "plane_basis": "mergelab.analysis.landscape",
    "PlaneBasis": "mergelab.analysis.landscape",
    "Curve": "mergelab.analysis.landscape",
    "PathResult": "mergelab.analysis.landscape",
    "PlaneResult": "mergelab.analysis.landscape",
    "plot_interpolation": "mergelab.analysis.landscape",
    "plot_plane": "mergelab.analysis.landscape",
    "weight_matching": "mergelab.analysis.alignment",
    "apply_permutation": "mergelab.analysis.alignment",
    "align": "mergelab.analysis.alignment",
    "aligned_interpolation": "mergelab.analysis.alignment",
    "PermutationSpec": "mergelab.analysis.alignment",
    "permutation_spec": "mergelab.analysis.alignment",
    "mlp_permutation_spec": "mergelab.analysis.alignment",
    "resnet_permutation_spec": "mergelab.analysis.alignment",
    "invert_permutation": "mergelab.analysis.alignment",
    "random_permutation": "mergelab.analysis.alignment",
    "matching_objective": "mergelab.analysis.alignment",
    "weight_distance": "mergelab.analysis.alignment",
    "UnsupportedArchitectureError": "mergelab.analysis.alignment",
    "linear_cka": "mergelab.analysis.cka",
    "model_cka": "mergelab.analysis.cka",
    "power_iteration": "mergelab.analysis.estimators",
    "hvp_operator": "mergelab.analysis.estimators",
    "hessian_top_eigenvalue": "mergelab.analysis.estimators",
    "PowerIterationResult": "mergelab.analysis.estimators",
    "gradient_statistics": "mergelab.analysis.estimators",
    "GradientStats": "mergelab.analysis.estimators",
    "gradient_heterogeneity": "mergelab.analysis.estimators",
    "heterogeneity_from_gram": "mergelab.analysis.heterogeneity",
    "HeterogeneityResult": "mergelab.analysis.estimators",
    "measure_tasks": "mergelab.analysis.estimators",
    "TaskMeasurement": "mergelab.analysis.estimators",
    "PoolMeasurement": "mergelab.analysis.estimators",
    "effective_noise_scale": "mergelab.analysis.noise_scale",
    "measured_noise_scale": "mergelab.analysis.noise_scale",
    "NoiseScaleReport": "mergelab.analysis.noise_scale",
    "normalized_layer_lrs": "mergelab.analysis.effective_lr",
    "NormalizedLayerLR": "mergelab.analysis.effective_lr",
    "BoundExpert": "mergelab.analysis.bound",
    "BoundPool": "mergelab.analysis.bound",
    "BoundConstants": "mergelab.analysis.bound",
    "evaluate_bound": "mergelab.analysis.bound",
    "BoundReport": "mergelab.analysis.bound",
    "predict_trends": "mergelab.analysis.bound_predictions",
    "BoundTrend": "mergelab.analysis.bound_predictions",
    "recommend": "mergelab.analysis.bound_predictions",
    "MergeRecommendation": "mergelab.analysis.bound_predictions",
    "per_expert_stability": "mergelab.analysis.bound",
    "merged_stability": "mergelab.analysis.bound",
    "generalization_term": "mergelab.analysis.bound",
    "effective_weights": "mergelab.analysis.bound",
    "chi2_divergence": "mergelab.analysis.bound",
    "BOUND_FORMULA": "mergelab.analysis.bound",
    "calibrate": "mergelab.analysis.calibration",
    "CalibrationResult": "mergelab.analysis.calibration",
    "fit_constants": "mergelab.analysis.calibration",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mergelab.analysis' has no attribute {name!r}")
