"""A small, fast end-to-end demonstration: pretrain, fine-tune three experts, merge with every method.

Everything is built offline from ``sklearn.datasets.load_digits`` (1,797 real 8x8 digits) in about half a
minute on two CPU cores:

1. a 3-layer MLP backbone is pretrained on a coarse task (digit // 2, five classes);
2. three experts are fine-tuned from it on different tasks (digits, transposed digits, inverted digits),
   each with its own linear head;
3. their backbones are written as safetensors and merged with every data-free method by the real engine
   (files in, files out), and each merged backbone is evaluated on every task with that task's expert head.

This is a smoke-scale illustration of the pipeline, not a benchmark; the issue-3 zoo is the real testbed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sklearn.datasets import load_digits
import torch
from torch import nn

from mergelab.checkpoints import load_state_dict, save_state_dict
from mergelab.merging import merge

log = logging.getLogger(__name__)


@dataclass
class DemoTask:
    name: str
    transform: Callable[[torch.Tensor], torch.Tensor]
    num_classes: int = 10


TASKS = (
    DemoTask("digits", lambda x: x),
    DemoTask("transposed", lambda x: x.view(-1, 8, 8).transpose(1, 2).reshape(-1, 64)),
    DemoTask("inverted", lambda x: 1.0 - x),
)

DEMO_SPECS: tuple[tuple[str, dict], ...] = (
    ("weight_average", {}),
    ("task_arithmetic", {"lambda": 1.0}),
    ("task_arithmetic", {"lambda": 0.4}),
    ("ties", {}),
    ("ties", {"trim_scope": "tensor", "lambda": 0.6}),
    ("dare_linear", {"lambda": 0.4}),
    ("dare_ties", {}),
    ("breadcrumbs", {"lambda": 0.4}),
    ("model_stock", {}),
)


def _backbone() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    cut = int(0.7 * len(y))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def _train(backbone: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
           seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        loss = nn.functional.cross_entropy(head(backbone(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def _accuracy(backbone: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((head(backbone(x)).argmax(1) == y).float().mean())


def run_demo(workdir: Path, *, progress: bool = False) -> list[dict]:
    """Run the demo in ``workdir``; return one row per method: per-task accuracy, average, normalized."""
    torch.manual_seed(0)
    workdir.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = _data()

    backbone = _backbone()
    _train(backbone, nn.Linear(64, 5), xtr, ytr // 2, steps=300, lr=0.05, seed=1)
    save_state_dict(backbone.state_dict(), workdir / "pretrained.safetensors")

    heads: dict[str, nn.Module] = {}
    expert_paths = []
    for i, task in enumerate(TASKS):
        expert = _backbone()
        expert.load_state_dict(backbone.state_dict())
        head = nn.Linear(64, task.num_classes)
        _train(expert, head, task.transform(xtr), ytr, steps=300, lr=0.05, seed=10 + i)
        heads[task.name] = head
        path = workdir / f"expert_{task.name}.safetensors"
        save_state_dict(expert.state_dict(), path)
        expert_paths.append(path)

    def evaluate(state_path: Path) -> dict[str, float]:
        model = _backbone()
        model.load_state_dict(load_state_dict(state_path))
        return {t.name: _accuracy(model, heads[t.name], t.transform(xte), yte) for t in TASKS}

    individual = {t.name: evaluate(p)[t.name] for t, p in zip(TASKS, expert_paths)}
    rows = [{"method": "pretrained (expert heads)", **evaluate(workdir / "pretrained.safetensors"), "seconds": 0.0},
            {"method": "individual experts", **individual, "seconds": 0.0}]
    for method, params in DEMO_SPECS:
        label = method + ("" if not params else " (" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")")
        out = workdir / ("merged_" + label.replace(" ", "").replace("(", "_").replace(")", "").replace(",", "_"))
        started = time.perf_counter()
        merge({"method": method, "base": str(workdir / "pretrained.safetensors"),
               "models": [str(p) for p in expert_paths], "parameters": params},
              out, overwrite=True, progress=progress)
        rows.append({"method": label, **evaluate(out), "seconds": time.perf_counter() - started})
    for row in rows:
        accs = [row[t.name] for t in TASKS]
        row["average"] = sum(accs) / len(accs)
        row["normalized"] = sum(row[t.name] / individual[t.name] for t in TASKS) / len(TASKS)
    return rows


def format_table(rows: list[dict]) -> str:
    names = [t.name for t in TASKS]
    header = f"{'method':42s}" + "".join(f"{n:>12s}" for n in names) + f"{'average':>10s}{'normalized':>12s}{'merge s':>9s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['method']:42s}" + "".join(f"{100 * r[n]:11.1f}%" for n in names)
            + f"{100 * r['average']:9.1f}%{100 * r['normalized']:11.1f}%{r['seconds']:9.2f}"
        )
    return "\n".join(lines)
