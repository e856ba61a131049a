"""Method comparison, multi-task learning and pool scaling on a tiny zoo (tiny pretrained resnet_s, quick experts)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

import mergelab.evaluation
import mergelab.tasks
from mergelab.cli import main
from mergelab.errors import SpecError
from mergelab.experiments.compare import run_comparison
from mergelab.experiments.comparison_rows import CATALOG
from mergelab.experiments.comparison_table import ComparisonTable, MethodRow
from mergelab.experiments.pool_scaling import PoolScalingResult, plan_pools, run_pool_scaling
from mergelab.models.pretraining import PretrainConfig
from mergelab.report.text import comparison_text, pool_scaling_text
from mergelab.tasks import TaskData
from tiny_zoo import pretrain_tiny
from mergelab.training import finetune, load_expert
from mergelab.training.multitask import MultitaskSpec, multitask_spec, read_multitask, train_multitask

TASKS = ["mnist", "mnist_rot90"]
EXTRA = "shapes"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(cache root, {task: expert folder}) with a tiny pretrained resnet_s and three quick experts."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cmpzoo")
    pretrain_tiny(root, PretrainConfig(steps=10, batch_size=32, lr=0.05))
    experts = {t: finetune(dict(task=t, steps=20, batch_size=32, data_ratio=0.1), root).path for t in [*TASKS, EXTRA]}
    yield root, experts
    torch.set_num_threads(before)


def _pool(zoo, tasks=TASKS):
    return [zoo[1][t] for t in tasks]


ALL_ROWS = list(CATALOG)


def test_ties_grid_reaches_every_task_arithmetic_lambda():
    """TIES's lambda grid must contain task arithmetic's: with task vectors on disjoint supports the elected
    sign is each entry's only nonzero delta and the disjoint mean over that one expert is the sum, so TIES at
    lambda (density 1, either divisor) is task arithmetic at lambda, entry for entry. The old grid (0.3 .. 1.3)
    could not reach TA's small lambdas, and on the resnet_s quickstart it chose its lower edge."""
    from mergelab.experiments.comparison_rows import TA_LAMBDA_GRID, TIES_LAMBDA_GRID
    from mergelab.merging.torch_backend import kernel
    from mergelab.methods import TensorInputs, get_method

    base = torch.tensor([0.5, -1.0, 2.0, 0.25, -0.75, 1.5])
    deltas = [torch.tensor([0.5, -0.25, 0.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, -2.0, 0.0, 0.0]),
              torch.tensor([0.0, 0.0, 0.0, 0.0, 0.125, -4.0])]
    experts = [base + d for d in deltas]
    assert set(TA_LAMBDA_GRID) <= set(TIES_LAMBDA_GRID) and min(TIES_LAMBDA_GRID) == min(TA_LAMBDA_GRID)
    ta, ties = get_method("task_arithmetic"), get_method("ties")
    inp = TensorInputs("w", base, experts, [1.0] * 3, None, torch.float64)
    for lam in TA_LAMBDA_GRID:
        expected = base.double() + lam * sum(d.double() for d in deltas)
        for run in (ta.reference, kernel(ta)):
            assert torch.allclose(run(inp, ta.parse_params({"lambda": lam})).double(), expected, atol=1e-6)
        for divisor in ("count", "weight"):
            p = ties.parse_params({"lambda": lam, "density": 1.0, "trim_scope": "tensor",
                                   "disjoint_divisor": divisor})
            for run in (ties.reference, kernel(ties)):
                assert torch.allclose(run(inp, p).double(), expected, atol=1e-6)


def test_comparison_quick_has_every_row_and_writes_csv_and_json(zoo, tmp_path):
    root, _ = zoo
    table = run_comparison("resnet_s", TASKS, ALL_ROWS, pool=_pool(zoo), cache_dir=root, workdir=tmp_path / "w",
                           progress=False, quick=True)
    assert table.tasks == TASKS and [r.method for r in table.rows] == ALL_ROWS
    for r in table.rows:
        assert r.error is None, (r.method, r.error)
        assert set(r.per_task) == set(TASKS) and set(r.per_task_loss) == set(TASKS)
        assert all(0.0 <= a <= 1.0 for a in r.per_task.values()), r
        assert r.average == pytest.approx(sum(r.per_task.values()) / len(TASKS))
        assert math.isfinite(r.normalized) and r.wall_s >= 0
    individual = table.row("individual")
    assert individual.normalized == pytest.approx(1.0)
    for t in TASKS:
        assert individual.per_task[t] == pytest.approx(load_expert(zoo[1][t]).test_metrics.accuracy)
    # merges are real files in the work folder, the comparison's settings are recorded
    assert (tmp_path / "w" / "ties").is_dir()
    # lambda chosen on the validation split: the grid point with the best validation accuracy (first on ties)
    for name in ("task_arithmetic", "ties", "dare", "tsv_merge", "iso_c", "iso_cts"):
        sel = table.row(name).params["selected"]["lambda"]
        scores = sel["validation_accuracy"]
        assert len(sel["grid"]) == len(scores) >= 3 and sel["chosen"] == sel["grid"][scores.index(max(scores))]
        assert table.row(name).params["lambda"] == sel["chosen"]
    scope = table.row("ties").params["selected"]["trim_scope"]
    assert set(scope["grid"]) == {"global", "tensor"} and table.row("ties").params["trim_scope"] == scope["chosen"]
    # BN statistics: the experts' mean, never trimmed, dropped or scaled by lambda
    assert table.row("task_arithmetic").params["overrides"][0]["parameters"] == {"lambda": 1 / len(TASKS)}
    assert table.row("dare").params["overrides"][0]["parameters"] == {"density": 1.0, "lambda": 1 / len(TASKS)}
    for name in ("tsv_merge", "iso_c", "iso_cts"):  # theta_0 + lambda * mean of task vectors, lambda = N / N
        assert table.row(name).params["overrides"][0]["parameters"] == {"lambda": 1.0}
        assert table.row(name).params["conv_as_matrix"] is True
    assert table.meta["bn"] == "joint" and all(r.bn in ("joint", "own") for r in table.rows)
    assert table.row("adamerging").params["bn"] == "batch"
    assert all("bn" not in table.row(m).params for m in ("fw_hard", "fw_soft"))  # batch only under per_task
    assert table.row("adamerging_surgery").params["merged"] == str(tmp_path / "w" / "adamerging")
    # in-process peak memory is measured from the reset high-water mark where Linux allows it
    assert table.row("weight_average").peak_mb > 0 or math.isnan(table.row("weight_average").peak_mb)

    text = comparison_text(table)
    assert "individual" in text and "100.0" in text and "peak MB" in text
    csv_path, json_path = table.to_csv(tmp_path / "c.csv"), table.to_json(tmp_path / "c.json")
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["method"] for r in rows] == ALL_ROWS and float(rows[1]["normalized"]) == pytest.approx(1.0)
    data = json.loads(json_path.read_text())
    assert data["tasks"] == TASKS and len(data["rows"]) == len(ALL_ROWS)
    back = ComparisonTable.from_dict(data)
    assert back.row("ties").per_task == table.row("ties").per_task
    # per-example outcomes, bit-packed (1 bit per example), agree with the accuracies; paired tests use them
    for r in back.rows:
        outs = r.outcomes()
        assert outs is not None and set(outs) == set(TASKS), r.method
        for t in TASKS:
            assert outs[t].size == r.per_task_n[t] and outs[t].mean() == pytest.approx(r.per_task[t]), (r.method, t)
            assert len(r.per_task_correct[t]) <= 4 * (r.per_task_n[t] // 24 + 1)
    same = back.paired_test("ties", "ties")
    assert same.difference == 0 and same.p_value == 1.0 and same.verdict() is None
    ties = back.paired_test("ties", "task_arithmetic")
    assert ties.difference == pytest.approx(back.row("ties").average - back.row("task_arithmetic").average)
    assert back.paired_test("ties", "no_such_row") is None


def test_isolated_merge_measures_peak_memory_in_a_fresh_process(zoo):
    root, _ = zoo
    table = run_comparison("resnet_s", TASKS, ["task_arithmetic"], pool=_pool(zoo), cache_dir=root,
                           progress=False, quick=True, isolate=True)
    row = table.row("task_arithmetic")
    assert row.error is None and math.isfinite(row.peak_mb) and row.peak_mb >= row.base_mb > 50
    assert table.meta["isolated"] and "ru_maxrss" in table.meta["memory_note"]


def test_a_larger_pool_is_merged_but_only_the_tasks_are_evaluated(zoo):
    root, experts = zoo
    table = run_comparison("resnet_s", ["mnist"], ["task_arithmetic", "fw_hard"], pool=list(experts.values()),
                           cache_dir=root, progress=False, quick=True, bn="per_task", select="fixed")
    assert table.tasks == ["mnist"] and len(table.meta["pool"]) == 3 and table.meta["bn"] == "per_task"
    assert table.row("task_arithmetic").params["lambda"] == 0.3 and "selected" not in table.row("task_arithmetic").params
    assert all(set(r.per_task) == {"mnist"} and 0 <= r.average <= 1 for r in table.rows)


def test_negative_running_variances_are_counted(zoo, tmp_path):
    from mergelab.experiments.compare import negative_variances
    from mergelab.models import read_backbone_state, save_backbone, build_backbone, load_backbone_state

    root, experts = zoo
    state = read_backbone_state(experts["mnist"])
    name = next(n for n in state if n.endswith("running_var"))
    state[name] = state[name].clone()
    state[name][:3] = -1.0
    backbone = build_backbone("resnet_s")
    with torch.no_grad():
        load_backbone_state(backbone, {n: t.abs() if n == name else t for n, t in state.items()})
        dict(backbone.named_buffers())[name].copy_(state[name])
    save_backbone(backbone, tmp_path / "backbone.safetensors")
    assert negative_variances(tmp_path) == 3 and negative_variances(experts["mnist"]) == 0


def test_multitask_training_runs_and_is_cached(zoo):
    root, experts = zoo
    spec = multitask_spec(TASKS, "resnet_s", experts=[experts[t] for t in TASKS], steps=3, batch_size=8)
    assert spec.head_init == "experts" and set(spec.head_experts) == set(TASKS)
    assert multitask_spec(list(reversed(TASKS)), experts=[experts[t] for t in TASKS], steps=3,
                          batch_size=8).spec_hash() == spec.spec_hash()
    first = train_multitask(spec, root, experts=[experts[t] for t in TASKS])
    assert not first.cached and len(first.loss_curve) == 3 and set(first.test_metrics) == set(TASKS)
    assert read_multitask(first.path) is not None and first.head_path("mnist").is_file()
    again = train_multitask(spec, root)  # heads found by spec hash in the cache; the model itself is cached
    assert again.cached and again.path == first.path
    # evaluation through the multi-task heads, normalized against each task's own expert
    result = mergelab.evaluation.evaluate(first.backbone_path, first.head_experts([experts[t] for t in TASKS]))
    for row in result.tasks:
        assert row.accuracy == pytest.approx(first.test_metrics[row.task].accuracy)

    def small(name, cache_dir=None):  # probe heads fitted on a few examples keep this test fast
        d = full(name, cache_dir)
        return TaskData(d.name, d.num_classes, d.x_train[:96], d.y_train[:96], d.x_test[:64], d.y_test[:64], d.description)

    full = mergelab.tasks.get_task
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mergelab.tasks, "get_task", small)
        probe = train_multitask(MultitaskSpec(tasks=TASKS, steps=2, batch_size=8, train_heads=False), root)
    assert probe.spec.head_init == "probe" and probe.path != first.path and len(probe.loss_curve) == 2


def test_multitask_spec_errors(zoo):
    with pytest.raises(SpecError, match="unknown task"):
        MultitaskSpec(tasks=["nope"])
    with pytest.raises(SpecError, match="needs an expert for every task"):
        MultitaskSpec(tasks=TASKS, head_init="experts", head_experts={"mnist": "abc"})
    with pytest.raises(SpecError, match="no expert 0000"):
        train_multitask(MultitaskSpec(tasks=["mnist"], head_init="experts", head_experts={"mnist": "0000"},
                                      steps=1), zoo[0])


def test_missing_tasks_and_bad_input_fail_clearly(zoo, tmp_path):
    root, experts = zoo
    with pytest.raises(SpecError, match=r"no cached default resnet_s expert for task\(s\) mnist_rot45.*mergelab zoo"):
        run_comparison("resnet_s", ["mnist_rot45"], ["task_arithmetic"], cache_dir=root, progress=False, quick=True)
    with pytest.raises(SpecError, match="no expert in the pool for shapes"):
        run_comparison("resnet_s", ["shapes"], ["ties"], pool=_pool(zoo), cache_dir=root, progress=False, quick=True)
    with pytest.raises(SpecError, match="unknown task 'mnistt'"):
        run_comparison("resnet_s", ["mnistt"], cache_dir=root, progress=False, quick=True)
    with pytest.raises(SpecError, match="unknown method 'tiez'"):
        run_comparison("resnet_s", TASKS, ["tiez"], pool=_pool(zoo), cache_dir=root, progress=False, quick=True)
    with pytest.raises(SpecError, match="pool: .*not an expert folder"):
        run_comparison("resnet_s", TASKS, ["ties"], pool=[tmp_path], cache_dir=root, progress=False, quick=True)
    with pytest.raises(SpecError, match="no pretrained resnet_s backbone"):
        run_comparison("resnet_s", TASKS, ["ties"], pool=_pool(zoo), cache_dir=tmp_path, progress=False, quick=True)


def test_cli_compare_and_its_errors(zoo, tmp_path, capsys):
    root, _ = zoo
    out = tmp_path / "out"
    code = main(["compare", "--pool", *map(str, _pool(zoo)), "--methods", "pretrained,individual,ties",
                 "--set", "ties.density=0.5", "--quick", "--no-isolate", "--no-progress", "--cache-dir", str(root),
                 "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "pretrained" in text and "ties" in text and (out / "comparison.csv").is_file()
    data = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["pretrained", "individual", "ties"]
    assert data["rows"][2]["params"]["density"] == 0.5 and (out / "merged" / "ties").is_dir()

    assert main(["compare", "--tasks", "mnist,count_dots", "--cache-dir", str(root), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "mergelab compare: error:" in err and "no cached default resnet_s expert" in err and "count_dots" in err


def test_plan_pools_orders_and_errors():
    avail = [f"t{i}" for i in range(10)]
    pools, evals = plan_pools("irrelevant", avail, ["t3", "t7"], [2, 6, 10], seed=1)
    assert pools[2] == ["t3", "t7"] and all(evals[n] == ["t3", "t7"] for n in pools)
    assert pools[10][:6] == pools[6] and sorted(pools[10]) == sorted(avail)
    pools, evals = plan_pools("relevant", avail, None, [4, 8], seed=0)
    assert evals[4] == pools[4] and pools[8][:4] == pools[4] and len(set(pools[8])) == 8
    assert plan_pools("relevant", avail, None, [4], seed=0) == plan_pools("relevant", avail, None, [4], seed=0)
    with pytest.raises(SpecError, match="needs 12 experts"):
        plan_pools("relevant", avail, None, [12])
    with pytest.raises(SpecError, match="must hold the 2 evaluated tasks"):
        plan_pools("irrelevant", avail, ["t0", "t1"], [1, 4])
    with pytest.raises(SpecError, match="no cached default expert"):
        plan_pools("irrelevant", avail, ["zz"], [4])
    with pytest.raises(SpecError, match="'irrelevant' or 'relevant'"):
        plan_pools("both", avail, None, [4])  # type: ignore[arg-type]


def test_pool_scaling_runs_on_the_tiny_zoo(zoo, monkeypatch, tmp_path):
    root, experts = zoo
    monkeypatch.setattr(mergelab.evaluation, "default_experts",
                        lambda arch, tasks=None, cache_dir=None, required=True: [load_expert(p) for p in experts.values()])
    seen = []
    result = run_pool_scaling("irrelevant", tasks=["mnist"], sizes=(1, 3), methods=["task_arithmetic", "fw_soft"],
                              cache_dir=root, progress=False, quick=True, on_table=lambda n, t: seen.append(n))
    assert seen == [1, 3] and result.pools[1] == ["mnist"] and len(result.pools[3]) == 3
    assert result.eval_tasks[3] == ["mnist"]
    for n in (1, 3):
        assert 0.0 <= result.accuracy("task_arithmetic", n) <= 1.0 and 0.0 <= result.accuracy("fw_soft", n) <= 1.0
    text = pool_scaling_text(result)
    assert "pool scaling (irrelevant" in text and "70.3" in text  # the paper's endpoints are quoted
    assert "Task arithmetic falls as irrelevant experts join" in text  # the claims' verdicts are printed
    back = PoolScalingResult.from_dict(json.loads(result.to_json(tmp_path / "p.json").read_text()))
    assert back.accuracy("fw_soft", 3) == pytest.approx(result.accuracy("fw_soft", 3))
    lines = list(csv.DictReader(result.to_csv(tmp_path / "p.csv").open()))
    assert len(lines) == 4 and {r["pool_size"] for r in lines} == {"1", "3"}


def test_method_row_json_turns_nan_into_null():
    row = MethodRow("pretrained", {"a": 0.5}, {"a": 1.0}, 0.5, 0.6, 0.0, math.nan, {})
    assert row.to_dict()["peak_mb"] is None
    table = ComparisonTable("resnet_s", ["a"], [row])
    assert json.loads(json.dumps(table.to_dict()))["rows"][0]["peak_mb"] is None


# ------------------------------------------------------------------- paired tests on hand-built outcomes
N_HAND = 100


def _hand_row(method: str, right: dict[str, range], error: str | None = None) -> MethodRow:
    """A row right exactly on the examples ``right[task]`` of ``N_HAND`` per task."""
    from mergelab.evaluation.outcomes import pack_outcomes

    outs = {}
    for t, idx in right.items():
        x = np.zeros(N_HAND, dtype=bool)
        x[list(idx)] = True
        outs[t] = x
    acc = {t: float(x.mean()) for t, x in outs.items()}
    return MethodRow(method, acc, {t: 1.0 for t in outs}, sum(acc.values()) / len(acc), math.nan, 1.0, math.nan, {},
                     error=error, per_task_correct={t: pack_outcomes(x) for t, x in outs.items()},
                     per_task_n={t: N_HAND for t in outs})


def _hand_table() -> ComparisonTable:
    both = lambda r: {"t1": r, "t2": r}  # noqa: E731
    rows = [_hand_row("pretrained", both(range(30))), _hand_row("individual", both(range(90))),
            _hand_row("task_arithmetic", both(range(60))), _hand_row("ties", both(range(65))),
            _hand_row("dare", both(range(2, 62))),
            _hand_row("fisher", {"t1": range(1, 65), "t2": range(63)}),
            _hand_row("fw_soft", both(range(99)), error="SpecError: boom")]
    return ComparisonTable("resnet_s", ["t1", "t2"], rows)


def test_paired_comparisons_have_hand_computed_mcnemar_and_holm_values(tmp_path):
    from mergelab.analysis.statistics import holm, mcnemar_exact

    # (only the merge right, only the reference right), pooled over the two tasks, by construction
    hand = {("task_arithmetic", "pretrained"): (60, 0), ("ties", "pretrained"): (70, 0),
            ("dare", "pretrained"): (64, 4), ("fisher", "pretrained"): (68, 1),
            ("ties", "task_arithmetic"): (10, 0), ("dare", "task_arithmetic"): (4, 4),
            ("fisher", "task_arithmetic"): (8, 1)}
    table = _hand_table()
    comps = table.paired_comparisons()
    assert [(c.method, c.reference) for c in comps] == list(hand)  # individual is a reference row, fw_soft failed
    assert [(c.test.a_only, c.test.b_only) for c in comps] == list(hand.values())
    assert [c.test.p_value for c in comps] == pytest.approx([mcnemar_exact(*bc) for bc in hand.values()])
    by = {(c.method, c.reference): c for c in comps}
    # McNemar by hand: 2 * 0.5^10 for (10, 0); 2 (1 + 8 + ... ) for (8, 1): 2 * 10 / 2^9; (4, 4): 1
    assert by["ties", "task_arithmetic"].test.p_value == pytest.approx(2 / 1024)
    assert by["fisher", "task_arithmetic"].test.p_value == pytest.approx(20 / 512)
    assert by["dare", "task_arithmetic"].test.p_value == 1.0
    # Holm over the 7: the four vs pretrained are tiny; ties vs TA is 5th smallest (x 3), fisher 6th (x 2), dare last
    assert by["ties", "task_arithmetic"].p_adjusted == pytest.approx(3 * 2 / 1024)
    assert by["fisher", "task_arithmetic"].p_adjusted == pytest.approx(2 * 20 / 512)  # 0.078: raw p < 0.05, Holm not
    assert by["dare", "task_arithmetic"].p_adjusted == 1.0
    assert [c.p_adjusted for c in comps] == pytest.approx(holm([c.test.p_value for c in comps]))
    assert [by[k].label for k in (("ties", "task_arithmetic"), ("fisher", "task_arithmetic"),
                                  ("dare", "task_arithmetic"), ("fisher", "pretrained"))] == [
        "better", "undecided", "undecided", "better"]
    assert by["fisher", "task_arithmetic"].test.difference == pytest.approx((0.04 + 0.03) / 2)
    # the printed table
    text = comparison_text(table)
    assert "Holm-adjusted over 7 comparisons" in text
    # the header names the test that was run (equal task sizes here: McNemar exact, no randomization floor)
    assert {c.test.method for c in comps} == {"McNemar exact"}
    assert "p: McNemar exact; Holm" in text and "randomization" not in text
    line = next(ln for ln in text.splitlines() if ln.startswith("fisher ") and "task_arithmetic" in ln)
    lo, hi = by["fisher", "task_arithmetic"].test.interval()
    assert line.split()[2:] == ["+3.5", f"[{100 * lo:+.1f},", f"{100 * hi:+.1f}]", f"{20 / 512:.2g}",
                                f"{40 / 512:.2g}", "undecided"]
    # per-example outcomes survive the JSON file; the comparisons are the same after it
    back = ComparisonTable.from_dict(json.loads(table.to_json(tmp_path / "c.json").read_text()))
    assert back.row("fisher").per_task_correct == table.row("fisher").per_task_correct
    assert back.row("fisher").per_task_n == {"t1": N_HAND, "t2": N_HAND}
    assert np.array_equal(back.row("fisher").outcomes()["t1"], table.row("fisher").outcomes()["t1"])
    assert [(c.method, c.reference, c.p_adjusted) for c in back.paired_comparisons()] == [
        (c.method, c.reference, c.p_adjusted) for c in comps]


def test_a_table_written_before_per_example_results_still_loads():
    from mergelab.report.convert import comparison_sections, comparison_verdicts

    data = json.loads(json.dumps(_hand_table().to_dict()))
    for r in data["rows"]:
        del r["per_task_correct"], r["per_task_n"]
    old = ComparisonTable.from_dict(data)
    assert old.row("ties").average == pytest.approx(0.65) and old.row("ties").outcomes() is None
    assert old.paired_comparisons() == [] and old.paired_test("ties", "task_arithmetic") is None
    text = comparison_text(old)
    assert "paired tests: none (no per-example results" in text and "p (Holm)" not in text
    assert all(v.agrees is None for v in comparison_verdicts(old))
    assert [t.title for t in comparison_sections(old)[0].tables] == [old.arch + ": accuracy per method on 2 tasks"]


def test_holm_keeps_false_positives_across_a_null_table_at_5_percent():
    """Six rows with the same per-task accuracies, outcomes drawn independently per example (A and B exchangeable
    on every example: the paired null): the share of tables with *any* significant comparison (9 per table)."""
    from mergelab.evaluation.outcomes import pack_outcomes

    rng = np.random.default_rng(0)
    tasks, n, acc = ["a", "b", "c"], 150, {"a": 0.6, "b": 0.75, "c": 0.5}
    methods = ["pretrained", "task_arithmetic", "ties", "dare", "adamerging", "fw_soft"]
    sims, any_holm, any_raw = 1000, 0, 0
    for _ in range(sims):
        rows = []
        for m in methods:
            outs = {t: rng.random(n) < acc[t] for t in tasks}
            pt = {t: float(o.mean()) for t, o in outs.items()}
            rows.append(MethodRow(m, pt, {t: 1.0 for t in tasks}, sum(pt.values()) / 3, math.nan, math.nan, math.nan,
                                  {}, per_task_correct={t: pack_outcomes(o) for t, o in outs.items()},
                                  per_task_n={t: n for t in tasks}))
        comps = ComparisonTable("x", tasks, rows).paired_comparisons()
        assert len(comps) == 9
        any_holm += any(c.verdict is not None for c in comps)
        any_raw += any(c.test.p_value < 0.05 for c in comps)
    se = math.sqrt(0.05 * 0.95 / sims)
    assert any_holm / sims <= 0.05 + 2 * se  # 3.8% here; 3.3% over 4,000 tables (seed 1)
    assert any_raw / sims > 0.15  # unadjusted: 24% of null tables show a "significant" difference
