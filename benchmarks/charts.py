"""The figures as pictures: PNG charts written next to latest.json and latest.md.

<name>-throughput.png   detector throughput by contender, the limit's bars apart
<name>-cpu.png          CPU per 1,000 records by contender (log scale: they span two orders)
<name>-latency-cdf.png  end-to-end latency CDF of ours, one panel per rate, one line per run
<name>-scale.png        our CPU per record and throughput at 1-4 partitions per process, 1 and 2 processes
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI

import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402

OURS_COLOR, LIMIT_COLOR, PEER_COLOR = "#1f77b4", "#7f7f7f", "#ff7f0e"


def draw_all(results: dict[str, Any], output_dir: Path, name: str = "latest") -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, draw in (("throughput", _throughput), ("cpu", _cpu), ("latency-cdf", _latency_cdf), ("scale", _scale)):
        figure = draw(results)
        if figure is None:
            continue
        path = output_dir / f"{name}-{suffix}.png"
        tmp = path.with_name(path.name + ".tmp")
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(figure)
        tmp.replace(path)  # a reader never sees half a file
        written.append(path)
    return written


def _measured(results: dict[str, Any], figure: str) -> list[tuple[str, float, str]]:
    out = []
    for key, entry in (results.get("detectors") or {}).items():
        value = entry.get(figure)
        if value:
            color = OURS_COLOR if key.startswith("ours") else LIMIT_COLOR if entry.get("limit") else PEER_COLOR
            out.append((_short(entry["label"]), value, color))
    return out


def _bars(rows: list[tuple[str, float, str]], *, title: str, xlabel: str, log: bool, fmt: str):
    if not rows:
        return None
    figure, axes = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    labels, values, colors = zip(*rows)
    positions = range(len(rows))
    axes.barh(positions, values, color=colors)
    axes.set_yticks(list(positions), labels)
    axes.invert_yaxis()
    if log:
        _log_x(axes)
    for y, value in zip(positions, values):
        axes.annotate(fmt.format(value), (value, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    axes.set_xlabel(xlabel)
    axes.set_title(title, fontsize=10)
    axes.margins(x=0.15)
    return figure


def _throughput(results: dict[str, Any]):
    return _bars(
        _measured(results, "throughput_tps"),
        title="Detector throughput (grey: the EOS passthrough limit)",
        xlabel="transactions per second",
        log=False,
        fmt="{:,.0f}",
    )


def _cpu(results: dict[str, Any]):
    return _bars(
        _measured(results, "cpu_ms_per_1k"),
        title="Detector CPU per 1,000 records (lower is better)",
        xlabel="CPU ms per 1,000 records (log scale)",
        log=True,
        fmt="{:,.2f}",
    )


def _latency_cdf(results: dict[str, Any]):
    from benchmarks.latency import CDF_FRACTIONS

    runs = (results.get("latency") or {}).get("runs") or []
    rates = sorted({run["rate_tps"] for run in runs})
    if not rates:
        return None
    figure, panels = plt.subplots(1, len(rates), figsize=(5 * len(rates), 3.6), squeeze=False, sharey=True)
    for axes, rate in zip(panels[0], rates):
        for run in (r for r in runs if r["rate_tps"] == rate):
            axes.plot(run["cdf_ms"], [100 * f for f in CDF_FRACTIONS], label=f"run {run['round'] + 1}")
        axes.set_xlim(left=0)
        axes.axhline(99, color=LIMIT_COLOR, linewidth=0.6, linestyle="--")
        axes.set_title(f"{rate:,} tx/s", fontsize=10)
        axes.set_xlabel("creation → readable (ms)")
        axes.grid(True, linewidth=0.3)
        axes.legend(fontsize=8, loc="lower right")
    panels[0][0].set_ylabel("% of records")
    figure.suptitle("End-to-end latency of ours, exactly-once (dashed: p99)", fontsize=10)
    figure.tight_layout()
    return figure


def _scale(results: dict[str, Any]):
    rows = (results.get("scale") or {}).get("rows") or []
    if not rows:
        return None
    figure, (cpu_axes, tps_axes) = plt.subplots(1, 2, figsize=(10, 3.6))
    for processes in sorted({row["processes"] for row in rows}):
        mine = sorted((r for r in rows if r["processes"] == processes), key=lambda r: r["partitions_per_process"])
        x = [r["partitions_per_process"] for r in mine]
        label = f"{processes} process{'es' if processes > 1 else ''}"
        cpu_axes.plot(x, [r["cpu_ms_per_1k"] for r in mine], marker="o", label=label)
        tps_axes.plot(x, [r["throughput_tps"] for r in mine], marker="o", label=label)
    for axes, ylabel in ((cpu_axes, "CPU ms per 1,000 records"), (tps_axes, "transactions per second")):
        axes.set_xlabel("partitions per detector process")
        axes.set_ylabel(ylabel)
        axes.set_xticks(sorted({row["partitions_per_process"] for row in rows}))
        axes.set_ylim(bottom=0)
        axes.grid(True, linewidth=0.3)
        axes.legend(fontsize=8)
    figure.suptitle("Ours as the work grows (CPU summed over processes)", fontsize=10)
    figure.tight_layout()
    return figure


def _log_x(axes) -> None:
    """A log x axis labelled in plain numbers at its decades only."""
    axes.set_xscale("log")
    formatter = ScalarFormatter()
    formatter.set_scientific(False)
    axes.xaxis.set_major_formatter(formatter)
    axes.xaxis.set_minor_formatter(NullFormatter())


def _short(label: str) -> str:
    """The part of a contender's label before its colon: the chart's tick labels stay short."""
    return label.split(":", 1)[0] if ":" in label and not label.startswith("limit") else label
