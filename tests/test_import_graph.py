"""The package's module-level import graph has no cycles, and the merge path's layers import one way.

Built from the source with :mod:`ast` (nothing is imported): an edge ``a -> b`` for every import of a
mergelab module ``b`` at module level of ``a`` (imports inside functions and under ``TYPE_CHECKING`` are not
edges: they run later or never). ``from pkg import sub`` of a submodule is an edge to ``pkg.sub``; of any
other name, an edge to ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mergelab"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """mergelab module -> the mergelab modules it imports at module level."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _module_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                source = node.module or ""
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([source] if source else []))
                targets = []
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in files else source)
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_detector_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _imports_of(prefix: str, graph: dict[str, set[str]]) -> set[str]:
    return {t for m, ts in graph.items() if m == prefix or m.startswith(prefix + ".") for t in ts}


def test_the_merge_path_imports_one_way():
    """checkpoints -> ops -> methods (catalog) -> merging -> training/evaluation (with models, tasks) ->
    data-informed methods -> the rest: no module of a lower layer imports a higher one at module level. The
    data-informed methods (AdaMerging, Frank-Wolfe, Fisher, RegMean, surgery) run trained experts on task
    data (models, tasks, training.result, evaluation's BN reset and metrics), so they sit above training and
    evaluation, which import no merge method."""
    graph = import_graph()
    higher = ("mergelab.analysis", "mergelab.experiments", "mergelab.report", "mergelab.commands",
              "mergelab.training", "mergelab.evaluation", "mergelab.cli")

    def under(targets: set[str], prefixes: tuple[str, ...]) -> set[str]:
        return {t for t in targets if any(t == p or t.startswith(p + ".") for p in prefixes)}

    assert under(_imports_of("mergelab.checkpoints", graph), ("mergelab.ops", "mergelab.merging",
                                                              "mergelab.methods") + higher) == set()
    assert under(_imports_of("mergelab.ops", graph), ("mergelab.merging", "mergelab.methods") + higher) == set()
    catalog = graph["mergelab.methods.catalog"] | graph["mergelab.methods.base"] | graph["mergelab.methods"]
    assert under(catalog, ("mergelab.merging", "mergelab.methods.data_informed") + higher) == set()
    assert under(_imports_of("mergelab.merging", graph), ("mergelab.methods.data_informed",) + higher) == set()
    for package in ("mergelab.training", "mergelab.evaluation", "mergelab.models", "mergelab.tasks"):
        assert under(_imports_of(package, graph), ("mergelab.methods.data_informed",)) == set(), package


#: Layers below the analyses: training/evaluation and the methods, models and tasks they use.
BELOW_ANALYSES = ("mergelab.training", "mergelab.evaluation", "mergelab.methods", "mergelab.models", "mergelab.tasks")
#: The analyses and everything above them.
ANALYSES_AND_ABOVE = ("mergelab.analysis", "mergelab.experiments", "mergelab.report", "mergelab.commands",
                      "mergelab.cli", "mergelab.quickstart", "mergelab.demo")


def upward_imports(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``{package below the analyses: the analysis-or-higher modules it imports at module level}`` (non-empty
    entries only)."""
    found = {}
    for package in BELOW_ANALYSES:
        up = {t for t in _imports_of(package, graph) if any(t == p or t.startswith(p + ".") for p in ANALYSES_AND_ABOVE)}
        if up:
            found[package] = up
    return found


def test_training_and_evaluation_sit_below_the_analyses():
    """training/evaluation (and the methods, models and tasks they use) import no analysis, study, report,
    command or CLI module at module level: what both layers need (e.g. per-example outcome packing,
    :mod:`mergelab.evaluation.outcomes`) lives in the lower one."""
    assert upward_imports(import_graph()) == {}


def test_the_layer_check_sees_an_upward_import():
    graph = {"mergelab.evaluation.task_suite": {"mergelab.analysis.statistics", "mergelab.models"},
             "mergelab.training.loop": {"mergelab.evaluation.metrics"}, "mergelab.analysis.bound": {"mergelab.report"}}
    assert upward_imports(graph) == {"mergelab.evaluation": {"mergelab.analysis.statistics"}}


def test_the_old_root_modules_are_gone():
    for name in ("engine", "merging", "merge_inputs", "numpy_engine", "numpy_ties", "numpy_storage",
                 "order_stats", "blockwise"):
        assert not (ROOT / f"{name}.py").exists(), name


#: The report's model: the one document and how it is written (imported by analyses and studies alike).
REPORT_MODEL = ("mergelab.report.document", "mergelab.report.figure_text", "mergelab.report.markdown",
                "mergelab.report.folder")


def test_the_report_model_sits_below_the_analyses():
    """The document model imports no analysis, study or command; analyses import only the model from report/
    (presentation of results, HTML and converters, is above them)."""
    graph = import_graph()
    banned = ("mergelab.analysis", "mergelab.experiments", "mergelab.commands", "mergelab.training",
              "mergelab.evaluation", "mergelab.merging", "mergelab.methods", "mergelab.cli")
    for module in REPORT_MODEL:
        assert {t for t in graph[module] if t.startswith(banned)} == set(), module
    report_imports = {t for t in _imports_of("mergelab.analysis", graph) if t.startswith("mergelab.report")}
    assert report_imports <= set(REPORT_MODEL) | {"mergelab.report"}, report_imports


def test_results_do_not_render_themselves():
    """Presentation of study results lives in report/: the study modules import nothing of report/ but its
    model, and no result class has a text or report rendering."""
    graph = import_graph()
    for module in ("mergelab.experiments.compare", "mergelab.experiments.comparison_rows",
                   "mergelab.experiments.comparison_table", "mergelab.experiments.pool_scaling"):
        assert {t for t in graph[module] if t.startswith("mergelab.report")} <= set(REPORT_MODEL), module
        source = (ROOT / "experiments" / f"{module.rsplit('.', 1)[1]}.py").read_text()
        for name in ("def format(", "def format_paired(", "def to_report(", "def report_sections(",
                     "from mergelab.report.convert import", "from mergelab.report.text import"):
            assert name not in source, (module, name)
