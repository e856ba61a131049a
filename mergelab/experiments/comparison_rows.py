"""The rows of a method comparison: which method each row runs, with which parameters and why.

Rows (:data:`DEFAULT_METHODS`, settings in :data:`CATALOG`):

* ``pretrained``: the pretrained backbone theta_0 read through each task's expert head (the floor).
* ``individual``: each task's own expert on its own task (the ceiling; normalized accuracy 1 by definition).
* ``multitask``: one backbone fine-tuned jointly on all the tasks' training data from theta_0
  (:mod:`mergelab.training.multitask`).
* merges, at the settings below. A row with a ``grid`` (task arithmetic, TIES, DARE, the spectral methods:
  lambda, and TIES's trim scope) chooses those values on validation data when the comparison runs with
  ``select="validation"`` (:mod:`mergelab.experiments.validation_selection`); ``select="fixed"`` uses the
  no-validation defaults below. The grids are the method catalog's (``Method.validation_grid``).

  ==================  ========================================================================================
  weight_average      plain average of the experts (Wortsman et al. 2022, model soups)
  task_arithmetic     lambda from the grid 0.05 .. 1.0 on validation; fixed: 0.3, the common default for many
                      tasks when no validation set is used (Ilharco et al. 2023 pick lambda on validation data,
                      0.3-0.4 for 8 ViT tasks; AdaMerging (Yang et al. 2024), TIES and FusionBench's 8-task
                      baselines report task arithmetic at 0.3)
  ties                density 0.2 (top 20 %), mass sign election, disjoint mean; lambda from the grid 0.05 .. 1.3
                      (task arithmetic's plus 1.3) and the trim scope (whole model, the paper's, or per tensor,
                      mergekit's) on validation (Yadav et al. 2023 search lambda on validation); fixed: lambda 1,
                      whole-model trim, the TIES paper's recommended setting without a validation set (sec. 7.4 /
                      app. C: k = 20 %, lambda 1)
  dare                DARE + task arithmetic: drop with density 0.5 and rescale by 1/0.5 (Yu et al. 2024; 0.5
                      is a neutral middle for a small model), then task arithmetic with lambda chosen as for
                      task arithmetic (fixed: 0.3)
  tsv_merge           TSV-Merge (Gargiulo et al. 2025): per layer, each task's top r/T singular components,
                      decorrelated (orthogonalised U and V), summed; iso_c / iso_cts (Marczak et al. 2025): the
                      TA sum's singular vectors (plus task-specific ones, 80 % common) with a flat spectrum.
                      lambda from the grid 0.1 .. 3 on validation (the authors search 0.1 .. 3.0); fixed: 1
                      (FusionBench). Convolutions are merged as (out, in*kh*kw) matrices (``conv_as_matrix``):
                      the papers average non-2-D tensors, which on resnet_s (no 2-D weight) would make all three
                      task arithmetic at lambda / T. Other tensors: the task vectors' mean times lambda
  fisher              Fisher merging, exact diagonal Fisher (Matena & Raffel 2022)
  regmean             RegMean, alpha 0.9, Linear and Conv2d layers (Jin et al. 2023)
  adamerging          layer-wise AdaMerging, 500 Adam steps, init 0.3 (Yang et al. 2024); with a BatchNorm
                      protocol other than ``merged`` it optimises with batch statistics (``bn: batch``)
  adamerging_surgery  representation surgery (rank 16, 1,000 steps per task; Yang et al. 2024b) on the
                      AdaMerging model; wall time and peak memory include AdaMerging's
  fw_hard / fw_soft   FW-Merging (Chen et al. 2025): hard, 3 iterations from task arithmetic (0.3) with line
                      search; soft, 15 iterations from theta_0, k = number of tasks
  ==================  ========================================================================================

Any other registered method name (``breadcrumbs``, ``model_stock`` ...) is a row with its defaults and its
catalog validation grid (:func:`method_configs`). ``quick_params`` are the tiny budgets of ``quick=True``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mergelab.errors import SpecError
from mergelab.methods import METHODS as DATA_FREE
from mergelab.methods import catalog

#: The default 4-task group of ``mergelab compare`` (tasks with different inputs and label spaces).
DEFAULT_TASKS: tuple[str, ...] = ("mnist", "mnist_rot90", "digits", "shapes")
REFERENCE_ROWS = ("pretrained", "individual", "multitask")
#: The rows every merge is tested against on the same examples
#: (:meth:`~mergelab.experiments.comparison_table.ComparisonTable.paired_comparisons`).
PAIRED_REFERENCES: tuple[str, ...] = ("pretrained", "task_arithmetic")


@dataclass(frozen=True)
class MethodConfig:
    """One row of the comparison: the mergelab method it runs and with which parameters (and why)."""

    name: str
    method: str | None  # None for the reference rows
    params: Mapping[str, Any] = field(default_factory=dict)
    quick_params: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    #: {parameter: candidate values} searched on validation data when ``select="validation"``.
    grid: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def parameters(self, quick: bool) -> dict[str, Any]:
        return {**self.params, **(self.quick_params if quick else {})}


_TA_LAMBDA = 0.3
#: TSV-Merge / Iso-C / Iso-CTS rows: lambda 1 without validation (FusionBench's default), and convolutions merged as
#: (out, in x kh x kw) matrices. The authors' code and FusionBench average every tensor that is not 2-D; resnet_s's
#: backbone has no 2-D weight (convolutions and BatchNorm only), so there all three would be the experts' average
#: scaled by lambda, i.e. task arithmetic at lambda / T, a row already. On vit_s only the patch embedding is 4-D.
_SPECTRAL: dict[str, Any] = {"lambda": 1.0, "conv_as_matrix": True}
#: lambda grids searched on validation data (``select="validation"``): the catalog's (``Method.validation_grid``).
TA_LAMBDA_GRID, TIES_LAMBDA_GRID, TIES_SCOPE_GRID = catalog.TA_LAMBDA_GRID, catalog.TIES_LAMBDA_GRID, catalog.TIES_SCOPE_GRID


def _grid(method: str) -> dict[str, tuple[Any, ...]]:
    """The hyperparameters a data-free ``method``'s paper chooses on validation data (the catalog's
    ``validation_grid``; none for a data-informed method)."""
    m = catalog.METHODS.get(method)
    return dict(m.validation_grid) if m is not None else {}


CATALOG: dict[str, MethodConfig] = {c.name: c for c in (
    MethodConfig("pretrained", None, source="theta_0 with the experts' heads"),
    MethodConfig("individual", None, source="each expert on its own task"),
    MethodConfig("multitask", None, {"steps": 200, "batch_size": 32}, {"steps": 4, "batch_size": 8},
                 "joint fine-tuning on all tasks (mergelab.training.multitask defaults)"),
    MethodConfig("weight_average", "weight_average", source="Wortsman et al. 2022"),
    MethodConfig("task_arithmetic", "task_arithmetic", {"lambda": _TA_LAMBDA},
                 source="lambda on validation (Ilharco et al. 2023); fixed: 0.3, the common no-validation default",
                 grid=_grid("task_arithmetic")),
    MethodConfig("ties", "ties", {"lambda": 1.0, "density": 0.2},
                 source="k 20%, lambda on validation (Yadav et al. 2023); fixed: lambda 1, the paper's "
                        "no-validation setting", grid=_grid("ties")),
    MethodConfig("dare", "dare_linear", {"density": 0.5, "lambda": _TA_LAMBDA},
                 source="DARE drop 0.5 + task arithmetic, lambda on validation (Yu et al. 2024); fixed: 0.3",
                 grid=_grid("dare_linear")),
    MethodConfig("tsv_merge", "tsv_merge", _SPECTRAL,
                 source="task singular vectors, k = r/T per task, lambda on validation (Gargiulo et al. 2025); "
                        "fixed: 1 (FusionBench); convolutions as (out, in*kh*kw) matrices", grid=_grid("tsv_merge")),
    MethodConfig("iso_c", "iso_c", _SPECTRAL,
                 source="isotropic spectrum of the TA sum, lambda on validation (Marczak et al. 2025); fixed: 1 "
                        "(FusionBench); convolutions as matrices", grid=_grid("iso_c")),
    MethodConfig("iso_cts", "iso_cts", {**_SPECTRAL, "common_space_fraction": 0.8},
                 source="common subspace 80 % + task-specific subspaces, isotropic, lambda on validation (Marczak "
                        "et al. 2025); fixed: 1 (FusionBench); convolutions as matrices", grid=_grid("iso_cts")),
    MethodConfig("fisher", "fisher", {}, source="exact diagonal Fisher (Matena & Raffel 2022)"),
    MethodConfig("regmean", "regmean", {}, source="alpha 0.9 (Jin et al. 2023)"),
    MethodConfig("adamerging", "adamerging", {}, {"steps": 3},
                 source="layer-wise, 500 steps, init 0.3 (Yang et al. 2024)"),
    MethodConfig("adamerging_surgery", "surgery", {}, {"steps": 10},
                 source="surgery rank 16, 1000 steps/task on AdaMerging (Yang et al. 2024b)"),
    MethodConfig("fw_hard", "fw_hard", {}, {"iterations": 1, "line_search_steps": 1},
                 source="3 iterations from TA 0.3, line search (Chen et al. 2025)"),
    MethodConfig("fw_soft", "fw_soft", {}, {"iterations": 2, "pgd_steps": 3},
                 source="15 iterations from theta_0, k = #tasks (Chen et al. 2025)"),
)}
#: Methods that take the BN protocol as a parameter: {method: {protocol: parameters}}.
BN_PARAMETERS: dict[str, dict[str, dict[str, Any]]] = {
    "adamerging": {"joint": {"bn": "batch"}, "per_task": {"bn": "batch"}},
    # FW's bn: batch normalises each task's batch by itself: the per_task protocol. Under joint it measured
    # worse than merged-statistics FW on the resnet_s zoo (fw_soft 71.5 vs 78.1, fw_hard 72.5 vs 74.7).
    "fw_hard": {"per_task": {"bn": "batch"}},
    "fw_soft": {"per_task": {"bn": "batch"}},
}
DEFAULT_METHODS: tuple[str, ...] = tuple(CATALOG)


def method_configs(methods: Sequence[str] | None) -> list[MethodConfig]:
    """The rows to compare for ``methods`` (``None``: :data:`DEFAULT_METHODS`): a :data:`CATALOG` row by its
    name, any other data-free or data-informed method with its defaults and its catalog validation grid;
    an unknown or repeated method is a :class:`SpecError` naming the known ones."""
    # deferred: the data-informed registry loads torch; this module is on the CLI parser's torch-free path
    from mergelab.methods.data_informed import registry

    if methods is None:
        return [CATALOG[m] for m in DEFAULT_METHODS]
    out = []
    informed = registry()
    for m in methods:
        if m in CATALOG:
            out.append(CATALOG[m])
        elif m in DATA_FREE or m in informed:
            out.append(MethodConfig(m, m, source="method defaults", grid=_grid(m)))
        else:
            known = list(CATALOG) + sorted((set(DATA_FREE) | set(informed)) - {c.method for c in CATALOG.values()})
            raise SpecError(f"unknown method {m!r}; known: {', '.join(known)}")
    if len({c.name for c in out}) != len(out):
        raise SpecError(f"methods: a method is listed twice: {list(methods)}")
    return out


__all__ = ["BN_PARAMETERS", "CATALOG", "DEFAULT_METHODS", "DEFAULT_TASKS", "PAIRED_REFERENCES", "REFERENCE_ROWS",
           "TA_LAMBDA_GRID", "TIES_LAMBDA_GRID", "TIES_SCOPE_GRID", "MethodConfig", "method_configs"]
