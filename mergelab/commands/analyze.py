"""``mergelab analyze SPEC.yaml [--out DIR] [--density D]``: a data-free mergeability report for a merge spec.

The spec is the merge spec (``base``, ``models`` with weights, ``method``, ``parameters``). Sections that
only data-dependent analyses use (``data:``, ``analysis:``) are accepted and set aside before the merge spec
is validated; other unknown top-level keys are ignored with a warning. Writes ``report.json``,
``report.md``, ``layers.csv`` and PNG plots into ``--out`` and prints a summary.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Top-level spec sections reserved for the analyses (not part of the merge spec).
RESERVED_SECTIONS = ("data", "analysis")

_DEFAULT_DENSITY = 0.2


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="data-free mergeability report for a merge spec (conflicts, dispersion, operator Delta_T)",
        description=(
            "Stream over the base and expert checkpoints of a merge spec and write a mergeability report: "
            "task-vector norms, cosine similarities, sign conflicts, dispersion around the consensus mean, "
            "its reduction by TIES/DARE/breadcrumbs operators (the empirical Delta_T of Corollary 1), and a "
            "heuristic expected method ranking."
        ),
    )
    p.add_argument("spec", help="the merge spec (YAML); 'data:' and 'analysis:' sections are accepted")
    p.add_argument("--out", "-o", help="report folder (default: <spec name>-analysis in the current folder)")
    p.add_argument("--density", type=float,
                   help=f"density d of trim/DARE/breadcrumbs (default: the spec's 'density' parameter, else "
                        f"{_DEFAULT_DENSITY})")
    p.add_argument("--trim-scope", choices=["tensor", "global"],
                   help="TIES trim per tensor or over the whole model (default: the spec's for method ties, "
                        "else tensor)")
    p.add_argument("--seed", type=int, help="DARE seed (default: the spec's 'seed', else 0)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="override the spec's device")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_analyze)


def load_analysis_spec(path: str | Path) -> tuple[Any, dict[str, Any], list[str]]:
    """Read a merge spec that may carry analysis sections.

    Returns ``(spec, sections, warnings)``: the validated :class:`~mergelab.spec.MergeSpec` (relative paths
    resolved against the file's folder), the reserved sections set aside (``data``, ``analysis``), and
    warnings about ignored keys. Raises :class:`~mergelab.errors.SpecError` naming the file on bad input.
    """
    import yaml

    from mergelab.errors import SpecError
    from mergelab.spec import MergeSpec, parse_spec

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raise SpecError(f"{path}: the spec is empty")
    if not isinstance(raw, Mapping):
        raise SpecError(f"{path}: a merge spec must be a mapping, got {type(raw).__name__}")
    data = dict(raw)
    sections = {key: data.pop(key) for key in RESERVED_SECTIONS if key in data}
    warnings = []
    for key in [k for k in data if k not in MergeSpec.model_fields]:
        warnings.append(f"{path}: ignoring unknown top-level section {key!r}")
        data.pop(key)
    spec = parse_spec(data, source=str(path), root=path.resolve().parent)
    if spec.overrides:
        warnings.append(f"{path}: per-tensor 'overrides' are not applied by the analysis (one density for all)")
    return spec, sections, warnings


def diagnostics_config(spec: Any, args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The :class:`~mergelab.analysis.diagnostics.DiagnosticsConfig` for ``spec`` and the command-line
    overrides, with notes saying where each setting came from."""
    from mergelab.analysis.diagnostics import DiagnosticsConfig
    from mergelab.methods import get_method

    method = get_method(spec.method)
    params = method.parse_params(spec.parameters)
    explicit = spec.parameters
    notes = []
    if args.density is not None:
        density = args.density
    elif "density" in explicit:
        density = params.density
        notes.append(f"density {density} from the spec's parameters")
    else:
        density = _DEFAULT_DENSITY
    if args.trim_scope is not None:
        trim_scope = args.trim_scope
    elif spec.method == "ties":
        trim_scope = params.trim_scope
        notes.append(f"trim scope '{trim_scope}' as the spec's ties merge")
    else:
        trim_scope = "tensor"
    seed = args.seed if args.seed is not None else getattr(params, "seed", 0)
    config = DiagnosticsConfig(
        density=density,
        trim_scope=trim_scope,
        sign_election=getattr(params, "sign_election", "mass"),
        dare_rescale=getattr(params, "rescale", "inverse"),
        breadcrumbs_gamma=getattr(params, "gamma", 0.01),
        seed=seed,
    )
    return config, notes


def run_analyze(args: argparse.Namespace) -> int:
    from mergelab.analysis.diagnostics import pool_diagnostics
    from mergelab.analysis.report import diagnostics_report, format_summary
    from mergelab.errors import SpecError

    spec, sections, warnings = load_analysis_spec(args.spec)
    if spec.base is None:
        raise SpecError(f"{args.spec}: base: the analysis needs the base (pretrained) model to form task vectors")
    if len(spec.models) < 2:
        raise SpecError(f"{args.spec}: models: the pool analysis needs at least two experts, got {len(spec.models)}")
    config, notes = diagnostics_config(spec, args)
    for w in warnings:
        print(f"warning: {w}")
    for note in notes:
        print(f"note: {note}")
    if sections:
        print(f"note: section(s) {', '.join(sections)} accepted; this report covers the data-free diagnostics only")
    out = Path(args.out) if args.out else Path(f"{Path(args.spec).stem}-analysis")
    diag = pool_diagnostics(
        spec.base,
        [m.path for m in spec.models],
        weights=[m.weight for m in spec.models],
        config=config,
        labels=[str(m.path) for m in spec.models],
        device=args.device or spec.device,
        progress=not args.no_progress,
    )
    for w in diag.warnings:
        print(f"warning: {w}")
    report = diagnostics_report(diag)
    report.meta["spec"] = str(Path(args.spec).resolve())
    report.meta["spec_method"] = spec.method
    report.meta["spec_sections_not_analysed"] = sorted(sections)
    paths = report.write(out, plots=not args.no_plots)
    print(format_summary(diag))
    print(f"wrote {paths.markdown}, {paths.json.name}, {len(paths.figures)} plot(s) and "
          f"{', '.join(p.name for p in paths.files) or 'no attachments'} into {paths.out_dir}")
    return 0
