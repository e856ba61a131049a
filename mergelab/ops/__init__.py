"""Pure tensor operators on task vectors, composable like optax transformations.

A task vector is ``tau_i = theta_i - theta_0`` (:func:`task_vector`). Per-vector operators (``trim``,
``trim_band``, ``drop``, ``scale``) map one task vector to another and compose with :func:`chain`;
combining operators (``weighted_sum``, ``weighted_mean``, ``elect_sign``, ``disjoint_mean``) reduce several
task vectors of one tensor to one. A data-free merging method is a named composition, e.g. TIES =
trim -> elect_sign -> disjoint_mean -> scale: its catalog entry (:mod:`mergelab.methods.catalog`) writes
that composition, and it is the specification the merge back-ends' kernels are tested against.
Each docstring states its formula.

The names below load on first use (PEP 562): ``from mergelab import ops`` costs nothing, so the catalog
can write its compositions with ``ops.trim`` and still validate a spec without importing torch. Three modules
here are torch-free on purpose, shared by the torch operators and the numpy back-end: :mod:`mergelab.ops.selection`,
the rank arithmetic of exact selection, :mod:`mergelab.ops.gram_matrix`, the block Gram rule and the coefficients
of the Gram-matrix methods (model stock, SLERP, NuSLERP, Multi-SLERP, Karcher), and :mod:`mergelab.ops.l1_rule`, the
L1 block rule and mergekit's L1 rescaling factor (``rescale: l1``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module defining it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("BLOCK", "BlockBuffers", "block_count", "block_ranges", "block_size"), "blocks"),
    **dict.fromkeys(("TensorOp", "chain", "identity", "task_vector"), "compose"),
    **dict.fromkeys(("disjoint_mean", "elect_sign", "scale", "weighted_mean", "weighted_sum"), "consensus"),
    **dict.fromkeys(("model_stock_ratio", "slerp", "slerp_coefficients"), "interpolate"),
    **dict.fromkeys(("Gram", "block_dot", "gram_from_partials", "gram_partials", "karcher_coefficients", "model_stock_ratio_from_gram",
                     "multislerp_coefficients", "nuslerp_coefficients", "nuslerp_t", "slerp_coefficients_from_gram",
                     "squared_norm_partials"), "gram_matrix"),
    **dict.fromkeys(("BlockKthLargest", "StreamingKthLargest", "kth_largest", "select_sample_size",
                     "select_small_size"), "select"),
    "keep_count": "selection",
    **dict.fromkeys(("block_l1", "l1_factor", "l1_from_partials"), "l1_rule"),
    **dict.fromkeys(("BlockRanks", "kth_largest_many", "quantile_sample_size"), "quantiles"),
    **dict.fromkeys(("common_and_specific_sizes", "isotropic", "isotropic_common_specific", "polar",
                     "svd_components", "task_singular_vectors"), "spectral"),
    **dict.fromkeys(("combine", "gram", "host_arrays", "nuslerp_rows"), "spherical"),
    **dict.fromkeys(("energy_weights", "expert_variance", "select_count", "select_mask"), "sce"),
    **dict.fromkeys(("active_count", "active_masks", "overlap_merge", "shared_unique_counts", "unique_scale"),
                    "overlap"),
    **dict.fromkeys(("fusion_importance", "fusion_importance_of", "fusion_merge", "fusion_row_divergence",
                     "fusion_rows", "fusion_threshold", "nearswap", "quantile_ranks"), "fusion"),
    **dict.fromkeys(("BlockTrim", "apply_mask_", "band_mask", "band_ranks", "by_rank", "descending_order", "drop",
                     "keep_top", "keep_top_into", "l1_norm", "magprune", "magprune_keep_probabilities",
                     "magprune_rank_probabilities", "remove_into", "rescale_l1", "rows_of", "top_set", "trim",
                     "trim_band"),
                    "sparsify"),
}

if TYPE_CHECKING:
    from mergelab.ops.blocks import BLOCK, BlockBuffers, block_count, block_ranges, block_size
    from mergelab.ops.compose import TensorOp, chain, identity, task_vector
    from mergelab.ops.consensus import disjoint_mean, elect_sign, scale, weighted_mean, weighted_sum
    from mergelab.ops.gram_matrix import (
        Gram,
        block_dot,
        gram_from_partials,
        gram_partials,
        karcher_coefficients,
        model_stock_ratio_from_gram,
        multislerp_coefficients,
        nuslerp_coefficients,
        nuslerp_t,
        slerp_coefficients_from_gram,
        squared_norm_partials,
    )
    from mergelab.ops.interpolate import model_stock_ratio, slerp, slerp_coefficients
    from mergelab.ops.spherical import combine, gram, host_arrays, nuslerp_rows
    from mergelab.ops.select import (
        BlockKthLargest,
        StreamingKthLargest,
        kth_largest,
        select_sample_size,
        select_small_size,
    )
    from mergelab.ops.fusion import (
        fusion_importance,
        fusion_importance_of,
        fusion_merge,
        fusion_row_divergence,
        fusion_rows,
        fusion_threshold,
        nearswap,
        quantile_ranks,
    )
    from mergelab.ops.overlap import active_count, active_masks, overlap_merge, shared_unique_counts, unique_scale
    from mergelab.ops.sce import energy_weights, expert_variance, select_count, select_mask
    from mergelab.ops.quantiles import BlockRanks, kth_largest_many, quantile_sample_size
    from mergelab.ops.selection import keep_count
    from mergelab.ops.l1_rule import block_l1, l1_factor, l1_from_partials
    from mergelab.ops.spectral import (
        common_and_specific_sizes,
        isotropic,
        isotropic_common_specific,
        polar,
        svd_components,
        task_singular_vectors,
    )
    from mergelab.ops.sparsify import (
        BlockTrim,
        apply_mask_,
        band_mask,
        band_ranks,
        by_rank,
        descending_order,
        drop,
        keep_top,
        keep_top_into,
        l1_norm,
        magprune,
        magprune_keep_probabilities,
        magprune_rank_probabilities,
        remove_into,
        rescale_l1,
        rows_of,
        top_set,
        trim,
        trim_band,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mergelab.ops' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mergelab.ops.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
