"""Benchmark output: the report object, its JSON form, the terminal table and the speedup plot.

The JSON report (``quickdraft bench --json OUT``)::

    {"model": path, "dtype": "bfloat16", "device": "cpu", "hardware": {...},
     "max_new_tokens": int, "temperature": float, "top_p", "top_k", "min_p", "seed",
     "questions": int, "baseline": "ar", "dataset", "per_category", "command": argv,
     "groups": [task groups in order],
     "run_order": [{"question_id", "methods": [method names in the order they ran on that question]}],
     "methods": {name: {
         "tokens_per_s": aggregate new tokens / seconds, "speedup": vs ar, "mean_accepted": tau or null,
         "identical": generations equal to ar's token for token, "total": generations compared,
         "per_category": {group: {"tokens_per_s", "speedup", "mean_accepted", "new_tokens", "seconds",
                                  "nodes_per_step"}},
         "new_tokens", "seconds", "generations", "target_forwards", "drafted_tokens",
         "nodes_per_step": mean rows per verification forward (null for peers),
         "draft_seconds_fraction": drafting time / total (null unless the engine reports drafting time),
         "divergences": [{"method", "question_id", "group", "turn", "position", "baseline_token",
                          "method_token", "top2_gap", "top1_token", "top2_token"}]}}}

Definitions of the numbers: :mod:`quickdraft.bench.metrics` and :mod:`quickdraft.bench.divergence`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quickdraft.bench.divergence import Comparison
from quickdraft.bench.harness import BenchRun
from quickdraft.bench.metrics import MethodMetrics
from quickdraft.devices import cpu_has_native_bf16, cpu_name

OVERALL = "overall"


@dataclass
class BenchReport:
    """A finished run: its settings, the raw records, aggregate metrics and the losslessness comparison."""

    run: BenchRun
    metrics: dict[str, MethodMetrics]
    comparisons: dict[str, Comparison]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(r.group for r in self.run.records))

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (keys: see the module docstring)."""
        methods = {}
        for name, m in self.metrics.items():
            comparison = self.comparisons.get(name, Comparison())
            entry: dict[str, Any] = {
                "tokens_per_s": m.overall.tokens_per_s,
                "speedup": m.speedup,
                "mean_accepted": m.overall.tau,
                "identical": comparison.identical,
                "total": comparison.total,
                "per_category": {
                    g: {
                        "tokens_per_s": t.tokens_per_s,
                        "speedup": m.group_speedup.get(g),
                        "mean_accepted": t.tau,
                        "new_tokens": t.new_tokens,
                        "seconds": t.seconds,
                        "nodes_per_step": t.nodes_per_step,
                    }
                    for g, t in m.per_group.items()
                },
                "new_tokens": m.overall.new_tokens,
                "seconds": m.overall.seconds,
                "generations": m.overall.generations,
                "target_forwards": m.overall.target_forwards,
                "drafted_tokens": m.overall.drafted_tokens,
                "nodes_per_step": m.overall.nodes_per_step,
                "draft_seconds_fraction": m.overall.draft_seconds_fraction,
                "divergences": [d.to_json() for d in comparison.divergences],
            }
            methods[name] = entry
        payload = dict(self.settings)
        payload.setdefault("baseline", self.run.baseline)
        payload["groups"] = self.groups
        payload["run_order"] = [{"question_id": q, "methods": list(order)}
                                for q, order in self.run.run_orders.items()]
        payload["methods"] = methods
        return payload

    def write_json(self, path: str | Path) -> None:
        _write_text(path, json.dumps(self.to_json(), indent=2) + "\n")


def _write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def hardware_info(device: Any = None) -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch


    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a hard dependency
        pass
    if torch.cuda.is_available():
        index = torch.device(device).index if device is not None and torch.device(device).type == "cuda" else None
        info["gpu"] = torch.cuda.get_device_name(index or 0)
        info["cuda"] = torch.version.cuda
    return info


def source_revision() -> dict[str, Any]:
    """Which quickdraft measured: its version and, in a git checkout, the commit (``-dirty`` if modified)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        revision: dict[str, Any] = {"version": version("quickdraft")}
    except PackageNotFoundError:
        revision = {"version": None}
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return revision
    revision["commit"] = commit + ("-dirty" if dirty else "")
    return revision


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def render_table(report: BenchReport, console: Any = None, max_divergences: int = 20) -> None:
    """Print the summary table (and the first divergences) with rich."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    groups = report.groups
    settings = report.settings
    console.print(
        f"quickdraft bench: {settings.get('model', '?')} ({settings.get('dtype', '?')}, "
        f"{settings.get('device', '?')}), {settings.get('max_new_tokens', '?')} new tokens, "
        f"temperature {settings.get('temperature', '?')}"
    )
    table = Table()
    table.add_column("method")
    table.add_column("tok/s", justify="right")
    table.add_column("speedup", justify="right")
    table.add_column("tau", justify="right")
    table.add_column("identical", justify="right")
    for group in groups:
        table.add_column(group, justify="right")
    for name, m in report.metrics.items():
        comparison = report.comparisons.get(name, Comparison())
        cells = [
            name,
            f"{m.overall.tokens_per_s:.1f}",
            _fmt(m.speedup, ".2f", "x"),
            _fmt(m.overall.tau, ".2f"),
            f"{comparison.identical}/{comparison.total}",
        ]
        for group in groups:
            tau = m.per_group[group].tau
            cells.append(_fmt(m.group_speedup.get(group), ".2f", "x") + (f" ({tau:.2f})" if tau is not None else ""))
        table.add_row(*cells)
    console.print(table)
    console.print(
        "speedup = aggregate tok/s / ar's in this run; tau = committed tokens per target forward "
        "(peers: unknown, '-'); per group: speedup (tau)."
    )
    divergences = [d for c in report.comparisons.values() for d in c.divergences]
    if divergences:
        div = Table(title=f"divergences from ar ({len(divergences)})", title_justify="left")
        for column in ("method", "question", "turn", "position", "ar token", "method token", "top-2 gap"):
            div.add_column(column, justify="right" if column != "method" else "left")
        for d in divergences[:max_divergences]:
            div.add_row(
                d.method,
                str(d.question_id),
                str(d.turn + 1),
                str(d.position),
                "EOS" if d.baseline_token is None else str(d.baseline_token),
                "EOS" if d.method_token is None else str(d.method_token),
                _fmt(d.top2_gap, ".4f"),
            )
        console.print(div)
        if len(divergences) > max_divergences:
            console.print(f"... {len(divergences) - max_divergences} more in the JSON report")


def plot_speedups(report: BenchReport, path: str | Path) -> None:
    """A PNG bar chart of speedup over ar per task group (and overall), one bar per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = report.groups + [OVERALL]
    methods = list(report.metrics)
    figure = Figure(figsize=(min(16.0, max(6.0, 1.5 + 0.3 * len(groups) * max(1, len(methods)))), 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(methods))
    for i, name in enumerate(methods):
        m = report.metrics[name]
        values = [m.group_speedup.get(g) for g in report.groups] + [m.speedup]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(groups))]
        axes.bar(xs, [v if v is not None else 0.0 for v in values], width, label=name)
    axes.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    axes.set_xticks(range(len(groups)))
    axes.set_xticklabels(groups, rotation=20, ha="right")
    axes.set_ylabel("speedup over ar (aggregate tok/s ratio)")
    settings = report.settings
    axes.set_title(
        f"{Path(str(settings.get('model', ''))).name} {settings.get('dtype', '')} on {settings.get('device', '')}",
        fontsize=10,
    )
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)


__all__ = ["BenchReport", "OVERALL", "hardware_info", "plot_speedups", "render_table", "source_revision"]
