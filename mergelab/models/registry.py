"""The architecture registry: names -> backbone constructors.

==========  ==========================================================  ===========================
name        backbone                                                    analogue
==========  ==========================================================  ===========================
resnet_s    ResNet, 1 basic block per stage, widths 16-32-64 (~78k)     ResNet-18
resnet_m    ResNet, 2 basic blocks per stage, widths 16-32-64 (~175k)   ResNet-50
resnet_l    ResNet, 4 basic blocks per stage, widths 16-32-64 (~370k)   ResNet-152
vit_s       ViT, patch 7, dim 64, depth 4, 4 heads, MLP x2 (~135k)      CLIP ViT-B/32
==========  ==========================================================  ===========================

Every backbone maps ``[B, 1, 28, 28]`` float32 images to ``[B, feature_dim]`` penultimate features and
exposes ``feature_dim``. Construction is deterministic under ``torch.manual_seed``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from mergelab.errors import SpecError
from mergelab.models.resnet import ResNetBackbone
from mergelab.models.vit import ViTBackbone


@dataclass(frozen=True)
class ArchInfo:
    """One registered architecture: its family ("resnet" or "vit"), constructor and a description."""

    name: str
    family: str
    build: Callable[[], nn.Module]
    description: str


_ARCHS: dict[str, ArchInfo] = {
    info.name: info
    for info in (
        ArchInfo("resnet_s", "resnet", lambda: ResNetBackbone(depth=1), "ResNet 3 stages x 1 block (ResNet-18 analogue)"),
        ArchInfo("resnet_m", "resnet", lambda: ResNetBackbone(depth=2), "ResNet 3 stages x 2 blocks (ResNet-50 analogue)"),
        ArchInfo("resnet_l", "resnet", lambda: ResNetBackbone(depth=4), "ResNet 3 stages x 4 blocks (ResNet-152 analogue)"),
        ArchInfo("vit_s", "vit", lambda: ViTBackbone(), "ViT patch 7, dim 64, depth 4 (CLIP ViT-B/32 analogue)"),
    )
}


def list_archs() -> list[str]:
    """Names of the registered architectures."""
    return list(_ARCHS)


def arch_info(arch: str) -> ArchInfo:
    """Registry entry of ``arch``; raises :class:`SpecError` naming the known architectures."""
    try:
        return _ARCHS[arch]
    except KeyError:
        raise SpecError(f"unknown architecture {arch!r}; known: {', '.join(_ARCHS)}") from None


def build_backbone(arch: str) -> nn.Module:
    """A freshly initialised backbone of ``arch`` (seed torch first for reproducible weights)."""
    return arch_info(arch).build()


def infer_arch(state: dict) -> str:
    """The registered architecture whose backbone state dict matches ``state``'s names and shapes.

    ``backbone.``-prefixed keys and ``num_batches_tracked`` counters are tolerated. Raises
    :class:`SpecError` when no architecture (or more than one) matches.
    """
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    given = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    matches = []
    for name in _ARCHS:
        own = {k: tuple(v.shape) for k, v in build_backbone(name).state_dict().items() if not k.endswith("num_batches_tracked")}
        if own == given:
            matches.append(name)
    if len(matches) != 1:
        raise SpecError(
            "cannot infer the architecture from the backbone's tensors "
            + ("(no registered architecture matches)" if not matches else f"(ambiguous: {matches})")
            + "; pass arch explicitly"
        )
    return matches[0]
