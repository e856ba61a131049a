"""``mergelab analyze SPEC.yaml [--out DIR] [--density D] [--with-data] [--constants FILE]``: a mergeability report.

The spec is the merge spec (``base``, ``models`` with weights, ``method``, ``parameters``, optionally ``data:``).
The ``data:`` and ``analysis:`` sections are set aside before the merge spec is validated (a data-free method
takes no ``data:`` when merging, but the analysis may use one); other unknown top-level keys are ignored with a
warning. Writes ``report.json``, ``report.md``, ``layers.csv`` and PNG plots into ``--out`` and prints a
summary.

**Data-free** sections always: task-vector diagnostics, the operators' Delta_T, a heuristic ranking.

**Data-dependent** sections (:mod:`mergelab.analysis.pool_analysis`, :mod:`mergelab.analysis.pool_report`) when the models are mergelab expert folders
and the spec has a ``data:`` section (a :class:`~mergelab.spec.DataSpec`: ``tasks``, ``samples_per_task``,
``split``, ``batch_size``, ``seed``), or with ``--with-data``: theory quantities at theta_0, the *(derived)*
stability bound with its constants (``--constants`` from ``mergelab calibrate``), predicted trends and a
recommendation, interpolation / task-arithmetic landscapes and CKA. ``--with-data`` requires them (an error
if the models are not expert folders); a ``data:`` section with models that are none of them expert folders is
set aside with a note (it cannot be analysed); ``--no-data`` skips them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mergelab.errors import SpecError
from mergelab.methods import get_method
from mergelab.methods.catalog import TRIM_RESCALED, DellaMixin
from mergelab.output_paths import refuse_overlap

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
                   help=f"density d of trim/DARE/MAGPRUNE/breadcrumbs (default: the spec's 'density' parameter, "
                        f"else {_DEFAULT_DENSITY})")
    p.add_argument("--trim-scope", choices=["tensor", "global"],
                   help="TIES trim per tensor or over the whole model (default: the spec's for method ties, "
                        "else tensor)")
    p.add_argument("--seed", type=int, help="DARE seed (default: the spec's 'seed', else 0)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="override the spec's device")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice; use 1 when the CPU "
                   "is shared: OpenMP threads spin badly under oversubscription)")
    g = p.add_argument_group(
        "data-dependent analysis",
        "needs expert folders as models and the pretrained folder as base; runs when the spec has a 'data:' "
        "section or with --with-data",
    )
    g.add_argument("--with-data", action="store_true",
                   help="run the data-dependent sections (default data settings if the spec has no 'data:')")
    g.add_argument("--no-data", action="store_true", help="skip the data-dependent sections even with 'data:'")
    g.add_argument("--constants", metavar="FILE",
                   help="calibrated bound constants (JSON from `mergelab calibrate`); default c_opt = c_stab = 1")
    g.add_argument("--samples", type=int, metavar="N",
                   help="samples per task (default: the data section's samples_per_task, 100)")
    g.add_argument("--hessian-iters", type=int, default=10, metavar="K",
                   help="power iterations for the smoothness L (default 10; 0 skips L and the bound)")
    g.add_argument("--heads", choices=["init", "expert"], default="init",
                   help="head for the theta_0 quantities: the initial head fine-tuning started from (recomputed, "
                        "default) or the expert's final head")
    g.add_argument("--grid", type=int, default=11, metavar="P", help="points of the interpolation grid (default 11)")
    g.add_argument("--bn", choices=["interpolate", "reset"], default="interpolate",
                   help="BatchNorm statistics along the landscape paths (default: combined like the weights)")
    g.add_argument("--no-landscape", action="store_true", help="skip the interpolation and task-arithmetic paths")
    g.add_argument("--no-cka", action="store_true", help="skip the CKA section")
    p.set_defaults(func=run_analyze)


def load_analysis_spec(path: str | Path) -> tuple[Any, dict[str, Any], list[str]]:
    """Read a merge spec that may carry analysis sections.

    Returns ``(spec, sections, warnings)``: the validated :class:`~mergelab.spec.MergeSpec` (relative paths
    resolved against the file's folder), the reserved sections set aside (``data``, ``analysis``), and
    warnings about ignored keys. Raises :class:`~mergelab.errors.SpecError` naming the file on bad input.
    """
    # deferred: yaml (about 90 ms); not on --help
    from mergelab.spec import MergeSpec, parse_spec, read_yaml_file

    path = Path(path)
    raw = read_yaml_file(path)
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
    # deferred: the analysis modules load torch; not on --help
    from mergelab.analysis.diagnostics import DiagnosticsConfig

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
        dare_rescale=getattr(params, "rescale", "inverse") if not isinstance(params, TRIM_RESCALED) else "inverse",
        trim_rescale=params.rescale if isinstance(params, TRIM_RESCALED) else "none",
        breadcrumbs_gamma=getattr(params, "gamma", 0.01),
        della_epsilon=params.epsilon if isinstance(params, DellaMixin) else DiagnosticsConfig.della_epsilon,
        della_spacing=params.spacing if isinstance(params, DellaMixin) else "paper",
        seed=seed,
    )
    return config, notes


def plan_data_analysis(spec: Any, sections: Mapping[str, Any], args: argparse.Namespace,
                       source: str) -> tuple[Any, Any, list[str]]:
    """Decide whether the data-dependent sections run and validate their inputs up front.

    Returns ``(data_spec, pool, notes)``: the :class:`~mergelab.spec.DataSpec` and the resolved
    :class:`~mergelab.analysis.pool_experts.PoolExperts` (both ``None`` when the data analysis does not run),
    and notes to print. Raises :class:`~mergelab.errors.SpecError` when it is requested but impossible: models
    that are not expert folders (with ``--with-data``, or when some but not all are), an invalid ``data:``
    section, a task in ``data.tasks`` with no expert.
    """
    # deferred: the analysis modules load torch; not on --help
    from mergelab.analysis.pool_experts import expert_folder, resolve_pool
    from mergelab.spec import DataSpec, MergeSpec

    raw = sections.get("data")
    notes: list[str] = []
    if args.no_data or not (args.with_data or raw is not None):
        if args.constants:
            notes.append("--constants applies to the data-dependent sections only; not used")
        return None, None, notes
    if not args.with_data:
        experts = [expert_folder(m.path) is not None for m in spec.models]
        if not any(experts):
            notes.append("section 'data' set aside: the models are not mergelab expert folders, so the "
                         "data-dependent analysis cannot run (it needs each expert's task, head and sidecar); "
                         "this report covers the data-free diagnostics only")
            return None, None, notes
    if raw is None:
        data = DataSpec()
    else:
        if not isinstance(raw, Mapping):
            raise SpecError(f"{source}: data: must be a mapping (tasks, samples_per_task, split, batch_size, seed), "
                            f"got {type(raw).__name__}")
        try:
            data = DataSpec.model_validate(dict(raw))
        except ValidationError as exc:
            lines = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in ("data", *err["loc"]))
                msg = (f"unknown field (allowed: {', '.join(DataSpec.model_fields)})"
                       if err["type"] == "extra_forbidden" else err["msg"])
                lines.append(f"  {loc}: {msg}")
            raise SpecError(f"{source}: invalid data section:\n" + "\n".join(lines)) from None
    assert isinstance(data, DataSpec) and isinstance(spec, MergeSpec)
    pool = resolve_pool(spec, data, source=source)
    return data, pool, notes


def data_options(data: Any, args: argparse.Namespace, device: str = "cpu") -> Any:
    """The :class:`~mergelab.analysis.pool_analysis.DataAnalysisOptions` from the data section and the flags."""
    # deferred: the analysis modules load torch; not on --help
    from mergelab.analysis.pool_analysis import DataAnalysisOptions

    if device == "auto":
        # deferred: torch, only when the command runs; not on --help
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"

    return DataAnalysisOptions(
        samples_per_task=args.samples if args.samples is not None else data.samples_per_task,
        eval_split=data.split or "test",
        seed=data.seed,
        batch_size=data.batch_size,
        hessian_iters=args.hessian_iters,
        heads=args.heads,
        grid=args.grid,
        bn=args.bn,
        landscape=not args.no_landscape,
        cka=not args.no_cka,
        device=device,
    )


def run_analyze(args: argparse.Namespace) -> int:
    # deferred: the analysis modules load torch; not on --help
    from mergelab.analysis.diagnostics import pool_diagnostics
    from mergelab.analysis.diagnostics_report import diagnostics_report, format_summary

    if getattr(args, "threads", None):
        # deferred: torch, only when the command runs; not on --help
        import torch

        torch.set_num_threads(max(1, args.threads))
    spec, sections, warnings = load_analysis_spec(args.spec)
    if spec.base is None:
        raise SpecError(f"{args.spec}: base: the analysis needs the base (pretrained) model to form task vectors")
    if len(spec.models) < 2:
        raise SpecError(f"{args.spec}: models: the pool analysis needs at least two experts, got {len(spec.models)}")
    if args.with_data and args.no_data:
        raise SpecError("--with-data and --no-data contradict each other")
    config, notes = diagnostics_config(spec, args)
    data, pool, data_notes = plan_data_analysis(spec, sections, args, str(args.spec))
    constants = opts = None
    if data is not None:
        # deferred: numpy (the bound's constants); not on --help
        from mergelab.analysis.bound_constants import load_constants

        constants = load_constants(args.constants)
        opts = data_options(data, args, args.device or spec.device)
    for w in warnings:
        print(f"warning: {w}")
    for note in notes + data_notes:
        print(f"note: {note}")
    not_analysed = sorted(k for k in sections if not (k == "data" and data is not None))
    if not_analysed and data is None and not data_notes:
        print(f"note: section(s) {', '.join(not_analysed)} accepted; this report covers the data-free diagnostics only")
    elif not_analysed:
        print(f"note: section(s) {', '.join(not_analysed)} accepted and not analysed")
    out = Path(args.out) if args.out else Path(f"{Path(args.spec).stem}-analysis")
    written = [out] + [out / name for name in ("report.json", "report.md", "layers.csv")]
    for path in written:  # the report goes into a folder: never into an input, nor over the spec
        refuse_overlap(path, [spec.base, *(m.path for m in spec.models), args.spec, args.constants],
                       what="--out" if path == out else "report file", replaces=False)
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
    report.meta["spec_sections_not_analysed"] = not_analysed
    analysis = None
    if data is not None:
        # deferred: the analysis modules load torch; not on --help
        from mergelab.analysis.pool_analysis import analyze_pool_data
        from mergelab.analysis.pool_report import add_data_sections

        if not args.no_progress:
            print("data-dependent analysis:", file=sys.stderr, flush=True)
        analysis = analyze_pool_data(spec, data, opts, constants=constants, pool=pool, source=str(args.spec),
                                     progress=not args.no_progress)
        for w in analysis.warnings:
            print(f"warning: {w}")
        add_data_sections(report, analysis)
    paths = report.write(out, plots=not args.no_plots)
    print(format_summary(diag))
    if analysis is not None:
        # deferred: the analysis modules load torch; not on --help
        from mergelab.analysis.pool_report import format_data_summary

        print(format_data_summary(analysis))
    print(f"wrote {paths.markdown}, {paths.json.name}, {len(paths.figures)} plot(s) and "
          f"{', '.join(p.name for p in paths.files) or 'no attachments'} into {paths.out_dir}")
    return 0
