"""The linear minimisation oracle of FW-Merging over a pool of checkpoints, block by block.

:func:`tensor_groups` partitions the tensors into the oracle's blocks (``task``: one block, the whole model;
``layer``: one per differentiable tensor, buffers joining their module's block). One pass over the pool,
:func:`linear_minimization_oracle`, scores every vertex i in every block B, ``<g_B, s_i,B - theta_B>`` for the
joint gradient and, with ``oracle: per_task``, for each task's own gradient, and selects the k best vertices
per block (see :mod:`~mergelab.methods.data_informed.frank_wolfe` for the rules); :class:`LMOResult` keeps
the score tables, the FW gap and the selection, and :func:`gather_vertices` assembles the selected vertices.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from mergelab.methods.data_informed.objectives import Point
from mergelab.methods.data_informed.vertex_pools import VertexPool

Granularity = Literal["task", "layer"]
Score = Literal["inner_product", "cosine"]
Oracle = Literal["per_task", "joint"]

#: the single group of task-wise FW (one vertex / coefficient vector for the whole model)
MODEL_GROUP = "<model>"
#: layer-wise: buffers of modules without parameters
UNASSIGNED_GROUP = "<buffers>"


# ---------------------------------------------------------------------------------------------- groups


def tensor_groups(names: Sequence[str], granularity: Granularity,
                  parameter_names: Collection[str] | None = None) -> dict[str, list[str]]:
    """Blocks of the oracle: ``group -> tensor names`` (a partition of ``names``).

    ``task``: one group holding everything. ``layer``: one group per differentiable tensor
    (``parameter_names``; default: all of ``names``); every other tensor (a buffer) joins the group of its own
    module's ``weight`` (or of the module's first parameter); buffers of parameter-free modules form the
    group :data:`UNASSIGNED_GROUP`.
    """
    if granularity == "task":
        return {MODEL_GROUP: list(names)}
    if granularity != "layer":
        raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}")
    params = [n for n in names if parameter_names is None or n in parameter_names]
    groups: dict[str, list[str]] = {n: [n] for n in params}
    by_module: dict[str, list[str]] = {}
    for p in params:
        by_module.setdefault(p.rsplit(".", 1)[0] if "." in p else "", []).append(p)
    leftover = []
    for n in names:
        if n in groups:
            continue
        module = n.rsplit(".", 1)[0] if "." in n else ""
        siblings = sorted(by_module.get(module, []), key=lambda p: p != f"{module}.weight" and p != "weight")
        if siblings:
            groups[siblings[0]].append(n)
        else:
            leftover.append(n)
    if leftover:
        groups[UNASSIGNED_GROUP] = leftover
    return groups


# --------------------------------------------------------------------------------------------------- LMO


@dataclass
class LMOResult:
    """What the oracle keeps of one pass over the pool: tables of scores, and the selection.

    ``tensors``: the tensors with a gradient (the columns of the per-tensor tables);
    ``tensor_inner[i, b] = <grad_b, s_i,b - theta_b>`` for the joint gradient (float64), and
    ``task_tensor_inner[t, i, b]`` the same for each task's own gradient (per-task oracle only, else ``None``);
    ``inner[i, G]``: ``tensor_inner`` summed over the tensors of group G;
    ``cosine[i, G] = sum_{b in G} cos(grad_b, s_i,b)`` (only with ``score == "cosine"``, else ``None``);
    ``selection[G]`` the vertex indices of group G, best joint score first (k of them, fewer when the pool
    is smaller); ``proposals[G, t]`` the vertex task t proposed for group G (per-task oracle only; -1: no
    vertex decreases task t's linearised loss in G, so it proposed none).
    """

    groups: list[str]
    inner: torch.Tensor
    cosine: torch.Tensor | None
    selection: torch.Tensor
    score: Score
    tensors: list[str] = field(default_factory=list)
    tensor_inner: torch.Tensor | None = None
    oracle: Oracle = "joint"
    tasks: list[str] = field(default_factory=list)
    task_tensor_inner: torch.Tensor | None = None
    proposals: torch.Tensor | None = None

    @property
    def gap(self) -> float:
        """The FW gap ``max_s <-grad, s - theta>`` (over the product of the groups' hulls: sum of group maxima)."""
        return float((-self.inner).amax(0).sum())

    @property
    def selected_gap(self) -> float:
        """``<-grad, s_sel - theta>`` for the top-1 selection (equals :attr:`gap` with the joint inner-product
        oracle)."""
        cols = torch.arange(len(self.groups))
        return float((-self.inner[self.selection[:, 0], cols]).sum())

    def selected(self) -> dict[str, list[int]]:
        return {g: self.selection[i].tolist() for i, g in enumerate(self.groups)}

    def proposed(self) -> dict[str, list[int]] | None:
        """``{group: [vertex proposed by each task, in the order of tasks]}`` (per-task oracle), else ``None``."""
        if self.proposals is None:
            return None
        return {g: self.proposals[i].tolist() for i, g in enumerate(self.groups)}

    def coefficient_gradient(self, coefficient_groups: Mapping[str, Sequence[str]],
                             selection_groups: Mapping[str, Sequence[str]]) -> torch.Tensor:
        """``d l / d lam[C, j]`` at ``lam = 0`` for the selected directions ``s_j - theta`` (slot j of every
        selection group): ``sum_{b in C} <grad_b, s_sel(G(b), j),b - theta_b>``, from the per-tensor table
        (no gradient needed)."""
        if self.tensor_inner is None:
            raise ValueError("the per-tensor table is missing")
        column = {b: i for i, b in enumerate(self.tensors)}
        group_of = {b: gi for gi, g in enumerate(selection_groups) for b in selection_groups[g]}
        m = self.selection.shape[1]
        out = torch.zeros(len(coefficient_groups), m, dtype=torch.float64)
        for ci, c in enumerate(coefficient_groups):
            for b in coefficient_groups[c]:
                if b in column:
                    out[ci] += self.tensor_inner[self.selection[group_of[b]], column[b]]
        return out


def _stable_order(values: torch.Tensor) -> list[int]:
    return torch.sort(values, stable=True).indices.tolist()


def _per_task_selection(task_table: torch.Tensor, joint: torch.Tensor, k: int) -> tuple[list[int], list[int]]:
    """Per-task selection for one group from ``task_table[t, i]`` (task t's score of vertex i) and the joint
    scores ``joint[i]``: each task proposes its best vertex if its score is negative (it decreases that task's
    linearised loss; else the task proposes nothing, recorded as -1); the distinct proposals, cut to the ``k``
    with the best joint score or filled up to ``k`` with the best remaining vertices by joint score; returned
    best joint score first, with the proposals."""
    proposals = []
    for row in task_table:
        best = int(torch.sort(row, stable=True).indices[0])
        proposals.append(best if float(row[best]) < 0 else -1)
    rank = _stable_order(joint)
    position = {v: r for r, v in enumerate(rank)}
    chosen = sorted({p for p in proposals if p >= 0}, key=lambda v: position[v])[:k]
    for v in rank:
        if len(chosen) >= k:
            break
        if v not in chosen:
            chosen.append(v)
    return sorted(chosen, key=lambda v: position[v]), proposals


def linear_minimization_oracle(grad: Mapping[str, torch.Tensor] | None, theta: Mapping[str, torch.Tensor],
                               pool: VertexPool, groups: Mapping[str, Sequence[str]], *,
                               score: Score = "inner_product", k: int = 1, oracle: Oracle = "joint",
                               task_grads: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> LMOResult:
    """Stream once through ``pool`` and select, per group, ``k`` vertices (see the module docstring).

    Scores: ``inner_product`` ``<grad_G, s_G - theta_G>`` (the FW LMO: argmin of the linearised objective) or
    ``cosine`` ``sum_{b in G} cos(grad_b, s_b)``. ``oracle: joint`` ranks by the joint gradient ``grad``;
    ``oracle: per_task`` needs ``task_grads`` (``{task: gradient of l_t}``; the joint gradient is then their
    mean, ``grad`` is not needed): each task proposes its best vertex per group, the distinct proposals are
    cut or filled to ``k`` by the joint score. With ``task_grads`` and ``oracle: joint`` the joint gradient
    is also their mean (the per-task tables are then recorded but not used). One vertex is loaded at a time
    and released before the next. Groups without a differentiable tensor follow the selection made on the
    scores summed over all groups.
    """
    n = len(pool)
    if n == 0:
        raise ValueError("the pool is empty")
    if score not in ("inner_product", "cosine"):
        raise ValueError(f"score must be 'inner_product' or 'cosine', got {score!r}")
    if oracle not in ("joint", "per_task"):
        raise ValueError(f"oracle must be 'joint' or 'per_task', got {oracle!r}")
    if oracle == "per_task" and not task_grads:
        raise ValueError("oracle 'per_task' needs each task's gradient (task_grads)")
    if task_grads is None and grad is None:
        raise ValueError("the oracle needs a gradient")
    k = max(1, min(int(k), n))
    names = list(groups)
    tasks = list(task_grads) if task_grads else []
    sources: list[Mapping[str, torch.Tensor]] = (
        [task_grads[t] for t in tasks] if task_grads else [grad])  # type: ignore[list-item]
    member = {b: j for j, g in enumerate(names) for b in groups[g]}
    tensors = [b for g in names for b in groups[g] if all(b in src for src in sources)]
    column = {b: c for c, b in enumerate(tensors)}
    rows = torch.zeros(len(sources), n, len(tensors), dtype=torch.float64)  # <g_src, s_i - theta> per tensor
    cos_rows = torch.zeros(len(sources), n, len(tensors), dtype=torch.float64) if score == "cosine" else None
    # the joint gradient is the mean of the sources; its cosine needs its norm, taken one tensor at a time
    joint_cos = torch.zeros(n, len(tensors), dtype=torch.float64) if score == "cosine" else None
    if score == "cosine":
        gnorm = torch.tensor([[float(src[b].norm()) for b in tensors] for src in sources], dtype=torch.float64)
        jnorm = torch.tensor([float(sum(src[b] for src in sources).norm()) / len(sources) for b in tensors],
                             dtype=torch.float64)
    for i in range(n):
        s = pool.load(i)
        for b in tensors:
            sb = s[b]
            diff = (sb - theta[b]).reshape(-1)
            c = column[b]
            snorm = float(sb.norm()) if score == "cosine" else 0.0
            dots = []
            for r, src in enumerate(sources):
                g = src[b].reshape(-1)
                rows[r, i, c] = float(torch.dot(g, diff))
                if cos_rows is not None:
                    dots.append(float(torch.dot(g, sb.reshape(-1))))
                    denom = float(gnorm[r, c]) * snorm
                    if denom > 0:
                        cos_rows[r, i, c] = dots[-1] / denom
            if joint_cos is not None:
                denom = float(jnorm[c]) * snorm
                if denom > 0:
                    joint_cos[i, c] = sum(dots) / len(dots) / denom
            del diff
        del s
    tensor_inner = rows.mean(0)
    aggregate = torch.zeros(len(tensors), len(names), dtype=torch.float64)
    for b, c in column.items():
        aggregate[c, member[b]] = 1.0

    def by_group(per_tensor: torch.Tensor) -> torch.Tensor:
        return per_tensor @ aggregate

    inner = by_group(tensor_inner)
    cosine = by_group(joint_cos) if joint_cos is not None else None
    joint_table = inner if cosine is None else cosine
    task_tables = None
    if task_grads:
        task_tables = torch.stack([by_group(r) for r in (rows if cos_rows is None else cos_rows)])  # [T, n, G]
    has_grad = [any(b in column for b in groups[g]) for g in names]
    proposals = None
    if oracle == "joint":
        overall = _stable_order(joint_table.sum(1))[:k]
        selection = torch.tensor([_stable_order(joint_table[:, j])[:k] if has_grad[j] else overall
                                  for j in range(len(names))], dtype=torch.long)
    else:
        assert task_tables is not None
        overall, overall_prop = _per_task_selection(task_tables.sum(2), joint_table.sum(1), k)
        sel, prop = [], []
        for j in range(len(names)):
            chosen, proposed = (_per_task_selection(task_tables[:, :, j], joint_table[:, j], k) if has_grad[j]
                                else (overall, overall_prop))
            sel.append(chosen)
            prop.append(proposed)
        selection = torch.tensor(sel, dtype=torch.long)
        proposals = torch.tensor(prop, dtype=torch.long)
    return LMOResult(names, inner, cosine, selection, score, tensors, tensor_inner, oracle, tasks,
                     rows if task_grads else None, proposals)


def gather_vertices(pool: VertexPool, selection: torch.Tensor, groups: Mapping[str, Sequence[str]],
                    theta: Mapping[str, torch.Tensor], *, subtract: bool) -> list[Point]:
    """Assemble the ``m = selection.shape[1]`` selected (composite) vertices, streaming each needed expert once.

    Slot j holds, for every group G, the tensors of vertex ``selection[G, j]`` (minus ``theta`` if
    ``subtract``: the directions ``s_j - theta``). Memory: the m assembled points plus one loaded expert.
    """
    names = list(groups)
    slots: list[Point] = [{} for _ in range(selection.shape[1])]
    for i in sorted(set(selection.flatten().tolist())):
        s = pool.load(i)
        for j, group in enumerate(names):
            for slot in (selection[j] == i).nonzero().flatten().tolist():
                for b in groups[group]:
                    t = s.pop(b)
                    slots[slot][b] = t.sub_(theta[b]) if subtract else t
        del s
    return slots


__all__ = ["MODEL_GROUP", "UNASSIGNED_GROUP", "LMOResult", "gather_vertices", "linear_minimization_oracle",
           "tensor_groups"]
