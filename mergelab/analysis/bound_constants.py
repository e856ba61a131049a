"""The bound's constants ``c_opt``, ``c_stab`` (and a loss ``floor``): the unit defaults, or calibrated ones read
from the JSON file ``mergelab calibrate`` writes (format :data:`CONSTANTS_FORMAT`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelab.analysis.bound import BoundConstants
from mergelab.errors import SpecError
from mergelab.untrusted_input import read_json_file

log = logging.getLogger(__name__)


#: ``format`` field of a constants file written by ``mergelab calibrate`` and read by ``analyze --constants``.
CONSTANTS_FORMAT = "mergelab-bound-constants/1"


@dataclass(frozen=True)
class LoadedConstants:
    """Bound constants and where they came from (``calibrated`` False: the unit defaults)."""

    c_opt: float = 1.0
    c_stab: float = 1.0
    floor: float = 0.0
    source: str | None = None
    calibrated: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def constants(self) -> Any:
        return BoundConstants(self.c_opt, self.c_stab)

    @property
    def note(self) -> str:
        if not self.calibrated:
            return ("constants c_opt = c_stab = 1 (not calibrated): the raw derived bound, meaningful as a ranking "
                    "score between pools, not as a loss value; calibrate with `mergelab calibrate` and pass "
                    "`--constants`")
        extra = []
        for key, label in (("n_pools", "pools"), ("test_spearman", "held-out Spearman"), ("arch", "arch")):
            if self.meta.get(key) is not None:
                v = self.meta[key]
                extra.append(f"{label} {v:.3g}" if isinstance(v, float) else f"{label} {v}")
        return (f"calibrated constants from {self.source}: c_opt = {self.c_opt:.4g}, c_stab = {self.c_stab:.4g}"
                + (f", floor = {self.floor:.4g}" if self.floor else "") + (f" ({', '.join(extra)})" if extra else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"c_opt": self.c_opt, "c_stab": self.c_stab, "floor": self.floor, "source": self.source,
                "calibrated": self.calibrated, "note": self.note, "calibration": dict(self.meta)}


def load_constants(path: str | Path | None) -> LoadedConstants:
    """Constants from a JSON file written by ``mergelab calibrate`` (``c_opt``, ``c_stab`` and optionally
    ``floor`` at the top level or under ``"constants"``); ``None`` gives the unit constants."""
    if path is None:
        return LoadedConstants()
    p = Path(path)
    try:
        raw = read_json_file(p, what="constants file", error=SpecError)
    except FileNotFoundError as exc:
        raise SpecError(f"{p}: cannot read constants: {exc.strerror or exc}") from None
    if not isinstance(raw, Mapping):
        raise SpecError(f"{p}: constants file must hold a JSON object with c_opt and c_stab")
    src = raw.get("constants", raw) if isinstance(raw.get("constants"), Mapping) else raw
    values = {}
    for key in ("c_opt", "c_stab", "floor"):
        v = src.get(key, raw.get(key, 0.0 if key == "floor" else None))
        if v is None:
            raise SpecError(f"{p}: constants file has no {key!r} (expected the output of `mergelab calibrate`)")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise SpecError(f"{p}: {key} must be a finite nonnegative number, got {v!r}")
        values[key] = float(v)
    if values["c_opt"] == 0 and values["c_stab"] == 0:
        raise SpecError(f"{p}: c_opt and c_stab are both 0: the calibrated bound would be constant")
    fmt_ = raw.get("format")
    if fmt_ is not None and fmt_ != CONSTANTS_FORMAT:
        log.warning("%s: format %r, expected %r; reading c_opt/c_stab anyway", p, fmt_, CONSTANTS_FORMAT)
    meta = {k: raw[k] for k in ("arch", "method", "n_pools", "n_train", "n_test", "test_spearman",
                                "test_spearman_raw", "created", "form") if k in raw}
    return LoadedConstants(values["c_opt"], values["c_stab"], values["floor"], str(p), True, meta)
