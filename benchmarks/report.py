"""What a benchmark run writes: the machine, the figures, the ratios ours/alternative, the targets.

JSON for tools (benchmarks/results/latest.json), markdown for people (latest.md, which the docs site
includes as it is: `make docs`, docs/hooks/generate.py).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from fraudstream.settings import PROJECT_ROOT, Settings

OURS = "ours"
OURS_VELOCITY = "ours_velocity"
QUIX, QUIX_VELOCITY, CONFLUENT = "quixstreams", "quixstreams_velocity", "confluent_per_message"
PRODUCER_PEER = "confluent_per_message"
# Goals (performance round 2). CPU per record is the machine-independent cost; the limit is the bare
# exactly-once passthrough measured in the same run.
LIMIT_THROUGHPUT_SHARE = 0.95  # ours' throughput, as a share of the best passthrough
LIMIT_CPU_FACTOR = 1.5  # ours' CPU per record, at most this many times the passthrough's at our batch size
CPU_ADVANTAGE = {QUIX: 10.0, CONFLUENT: 8.0}  # at least this many times less CPU per record than each
VELOCITY_CPU_ADVANTAGE = 5.0  # against quixstreams, both with the velocity rule
PRODUCER_RATIO_TARGET = 3.0
LATENCY_P99_TARGETS_MS = {2_000: 30.0, 10_000: 50.0}
LATENCY_TARGET_RATE = 2_000  # the rate of the latency profile


def median(values: list[float], digits: int = 1) -> float | None:
    return round(statistics.median(values), digits) if values else None


def machine(settings: Settings) -> dict[str, Any]:
    import confluent_kafka
    import fastavro
    import kafka

    import fraudstream

    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "fraudstream": fraudstream.__version__,
            "git_commit": _git_commit(),
            "confluent_kafka": confluent_kafka.__version__,
            "librdkafka": confluent_kafka.libversion()[0],
            "fastavro": fastavro.__version__,
            "kafka_python": kafka.__version__,
            "quixstreams": _pinned("quixstreams"),
            "kafka_broker": _kafka_version(settings),
            "schema_registry": _registry_version(settings),
        },
        "bootstrap_servers": settings.bootstrap_servers,
        "schema_registry_url": settings.schema_registry_url,
    }


def limits(detectors: dict[str, Any]) -> tuple[dict | None, dict | None]:
    """The passthrough at our transaction size, and the fastest passthrough of the run."""
    measured = [e for e in detectors.values() if e.get("limit") and e.get("throughput_tps")]
    ours_batch = (detectors.get(OURS) or {}).get("batch")
    at_ours = next((e for e in measured if e["batch"] == ours_batch and not e.get("produce_batch")), None)
    best = max(measured, key=lambda e: e["throughput_tps"], default=None)
    return at_ours, best


def ratios(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """ours / alternative for throughput and memory, alternative / ours for CPU per record (above 1:
    ours is faster, bigger, or cheaper), and every contender against the limit."""
    out: dict[str, dict[str, float | None]] = {}
    for section, figure, name in (
        ("detectors", "throughput_tps", "detector_throughput"),
        ("detectors", "peak_rss_mib", "detector_peak_rss"),
        ("producers", "throughput_tps", "producer_throughput"),
    ):
        entries = results.get(section) or {}
        ours = (entries.get(OURS) or {}).get(figure)
        out[name] = {f"ours/{key}": _ratio(ours, entry.get(figure)) for key, entry in entries.items() if key != OURS}
    detectors = results.get("detectors") or {}
    ours_cpu = (detectors.get(OURS) or {}).get("cpu_ms_per_1k")
    out["detector_cpu"] = {
        f"{key}/ours": _ratio(entry.get("cpu_ms_per_1k"), ours_cpu) for key, entry in detectors.items() if key != OURS
    }
    at_ours, best = limits(detectors)
    for name, limit in (("vs_limit_at_our_batch", at_ours), ("vs_best_limit", best)):
        out[f"throughput_{name}"] = {
            key: _ratio(e.get("throughput_tps"), (limit or {}).get("throughput_tps")) for key, e in detectors.items()
        }
        out[f"cpu_{name}"] = {
            key: _ratio(e.get("cpu_ms_per_1k"), (limit or {}).get("cpu_ms_per_1k")) for key, e in detectors.items()
        }
    return out


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    r = results["ratios"]
    detectors = results.get("detectors") or {}
    at_ours, best = limits(detectors)

    def target(name: str, goal: str, value: float | None, met, shown: str) -> dict[str, Any]:
        return {
            "name": name,
            "target": goal,
            "measured": None if value is None else shown.format(value),
            "met": None if value is None else met(value),
        }

    share = r.get("throughput_vs_best_limit", {}).get(OURS)
    cpu_factor = r.get("cpu_vs_limit_at_our_batch", {}).get(OURS)
    found = [
        target(
            f"detector throughput, share of the EOS passthrough limit (its best: "
            f"{(best or {}).get('batch') or 0:,} per transaction)",
            f">= {LIMIT_THROUGHPUT_SHARE:.0%}",
            share,
            lambda v: v >= LIMIT_THROUGHPUT_SHARE,
            "{:.0%}",
        ),
        target(
            f"detector CPU per record, times the passthrough's at {(at_ours or {}).get('batch') or 0:,} "
            "per transaction",
            f"<= {LIMIT_CPU_FACTOR:g}x",
            cpu_factor,
            lambda v: v <= LIMIT_CPU_FACTOR,
            "{:.2f}x",
        ),
    ]
    for key, factor in CPU_ADVANTAGE.items():
        value = r.get("detector_cpu", {}).get(f"{key}/ours")
        label = (detectors.get(key) or {}).get("label", key)
        found.append(
            target(f"less CPU per record than {label}", f">= {factor:g}x", value, lambda v, f=factor: v >= f, "{:.1f}x")
        )
    velocity = _ratio(
        (detectors.get(QUIX_VELOCITY) or {}).get("cpu_ms_per_1k"),
        (detectors.get(OURS_VELOCITY) or {}).get("cpu_ms_per_1k"),
    )
    found.append(
        target(
            "less CPU per record than quixstreams, both with the velocity rule",
            f">= {VELOCITY_CPU_ADVANTAGE:g}x",
            velocity,
            lambda v: v >= VELOCITY_CPU_ADVANTAGE,
            "{:.1f}x",
        )
    )
    producer = r.get("producer_throughput", {}).get(f"ours/{PRODUCER_PEER}")
    found.append(
        target(
            "producer throughput vs the per-message AvroSerializer way",
            f">= {PRODUCER_RATIO_TARGET:g}x",
            producer,
            lambda v: v >= PRODUCER_RATIO_TARGET,
            "{:.2f}x",
        )
    )
    for rate, goal in LATENCY_P99_TARGETS_MS.items():
        p99 = latency_summary(results).get(rate, {}).get("p99_ms")
        found.append(
            target(
                f"end-to-end p99 latency at {rate:,} tx/s (median of the runs)",
                f"<= {goal:g} ms",
                p99,
                lambda v, g=goal: v <= g,
                "{:g} ms",
            )
        )
    return found


def latency_summary(results: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Per rate: the median of each figure over the runs, and its range."""
    by_rate: dict[int, list[dict]] = {}
    for run in (results.get("latency") or {}).get("runs", []):
        by_rate.setdefault(run["rate_tps"], []).append(run)
    out = {}
    for rate, runs in by_rate.items():
        out[rate] = {
            "runs": len(runs),
            "records": sum(r["records"] for r in runs),
            "achieved_tps": median([r["achieved_tps"] for r in runs]),
        }
        for figure in (
            "p50_ms",
            "p99_ms",
            "max_ms",
            "created_to_produced_p50_ms",
            "created_to_produced_p99_ms",
            "produced_to_readable_p50_ms",
            "produced_to_readable_p99_ms",
        ):
            values = [r[figure] for r in runs]
            out[rate][figure] = median(values)
            out[rate][figure + "_range"] = (min(values), max(values))
    return out


def write(results: dict[str, Any], output_dir: Path, name: str = "latest") -> tuple[Path, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / f"{name}.json", output_dir / f"{name}.md"
    # Write then rename: a reader never sees half a file.
    for path, text in ((json_path, json.dumps(results, indent=2) + "\n"), (md_path, markdown(results))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return json_path, md_path


def markdown(results: dict[str, Any]) -> str:
    m, config = results["machine"], results["config"]
    v = m["versions"]
    lines = [
        f"Measured {results['started_at'][:16].replace('T', ' ')} UTC at commit `{v.get('git_commit') or '?'}` in "
        f"one run of `python -m benchmarks` ({results['duration_s'] / 60:.1f} min"
        f"{', --quick' if config['quick'] else ''}): {m['cpu_count']} cores ({m['cpu_model']}), "
        f"{m['memory_gib']} GiB, {m['platform']}; Python {m['python']}, confluent-kafka {v['confluent_kafka']} "
        f"(librdkafka {v['librdkafka']}), fastavro {v['fastavro']}, kafka-python {v['kafka_python']}, "
        f"quixstreams {v.get('quixstreams') or '-'}; Kafka {v['kafka_broker'] or '?'}, "
        f"schema registry {v['schema_registry'] or '?'}; everything on the same machine.",
        "",
    ]
    detectors = results.get("detectors") or {}
    if detectors:
        ours = detectors.get(OURS) or {}
        at_ours, best = limits(detectors)
        limit_tps = (at_ours or {}).get("throughput_tps")
        limit_cpu = (at_ours or {}).get("cpu_ms_per_1k")
        lines += [
            f"**Detector**: {config['count']:,} pre-filled transactions, from the first routed record until all are "
            "readable by a read_committed consumer; median of the runs (a detector is not run again once its "
            f"runs add up to {config['enough_seconds']:g} s). Ours with transactions that grow with the backlog "
            f"up to {config['ours_batch_max_records']:,} records and close when the input runs dry, "
            f"{config['ours_decoder']} decoder. CPU: the process's user+system time over the same window, per "
            "1,000 records (start-up and shutdown left out). The limit is a bare exactly-once passthrough "
            f"(no decode, no rule); ratios to the limit are against the passthrough at "
            f"{(at_ours or {}).get('batch') or 0:,} records per transaction, ours' size.",
            "",
            "| Detector | Delivery | Runs | Throughput (tx/s) | ÷ limit | CPU ms per 1k tx | CPU × limit's "
            "| CPU ÷ ours' | Peak RSS (MiB) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for entry in detectors.values():
            tps, cpu = entry.get("throughput_tps"), entry.get("cpu_ms_per_1k")
            name = f"**{entry['label']}**" if entry.get("limit") else entry["label"]
            lines.append(
                f"| {name} | {entry['delivery']} | {len(entry['runs'])} | {_num(tps)} | "
                f"{_pct(_ratio(tps, limit_tps))} | {_num(cpu, 2)} | {_times(_ratio(cpu, limit_cpu))} | "
                f"{_times(_ratio(cpu, ours.get('cpu_ms_per_1k')))} | {_num(entry.get('peak_rss_mib'), 1)} |"
                + (f" failed: {entry['error']}" if entry.get("error") else "")
            )
        lines.append("")
    producers = results.get("producers") or {}
    if producers:
        ours = (producers.get(OURS) or {}).get("throughput_tps")
        lines += [
            f"**Producer**: {config['producer_count']:,} transactions (and their labels), unthrottled, "
            f"until all are acknowledged; median of {config['runs']} runs",
            "",
            "| Producer | Throughput (tx/s) | Ours ÷ it |",
            "|---|---:|---:|",
        ]
        for entry in producers.values():
            tps = entry.get("throughput_tps")
            lines.append(
                f"| {entry['label']} | {_num(tps)} | {_times(_ratio(ours, tps))} |"
                + (f" failed: {entry['error']}" if entry.get("error") else "")
            )
        lines.append("")
    latency = results.get("latency") or {}
    if latency.get("runs") or latency.get("error"):
        summary = latency_summary(results)
        runs = config.get("latency_runs", 1)
        lines += [
            f"**End-to-end latency** (ours, exactly-once): our producer at a fixed rate for "
            f"{config['latency_seconds']:g} s, {runs} run{'s' if runs != 1 else ''} per rate (rates alternating, one "
            "detector throughout); from a transaction's creation (its event_time) until it is readable by a "
            "read_committed consumer on the legit or fraud topic. Median of the runs, and their range.",
            "",
            "| Rate (tx/s) | Runs | Records | p50 (ms) | p99 (ms) | max (ms) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for rate, row in summary.items():
            lines.append(
                f"| {rate:,} | {row['runs']} | {row['records']:,} | {_spread(row, 'p50_ms')} | "
                f"{_spread(row, 'p99_ms')} | {_spread(row, 'max_ms')} |"
            )
        if summary:
            lines += [
                "",
                "Where it goes, split at the moment the detector produces the record (its Kafka timestamp), medians:",
                "",
                "| Rate (tx/s) | created → produced by the detector, p50 / p99 (ms) "
                "| produced → readable, p50 / p99 (ms) |",
                "|---:|---:|---:|",
            ]
            for rate, row in summary.items():
                lines.append(
                    f"| {rate:,} | {_num(row['created_to_produced_p50_ms'], 1)} / "
                    f"{_num(row['created_to_produced_p99_ms'], 1)} | "
                    f"{_num(row['produced_to_readable_p50_ms'], 1)} / "
                    f"{_num(row['produced_to_readable_p99_ms'], 1)} |"
                )
        if latency.get("error"):
            lines.append(f"\nLatency run failed: {latency['error']}")
        lines.append("")
    scale = results.get("scale") or {}
    if scale.get("rows") or scale.get("error"):
        batch = next((row["batch_max_records"] for row in scale["rows"]), config["ours_batch_max_records"])
        lines += [
            f"**Scale** (ours): {scale['count']:,} pre-filled transactions per configuration, one run each; N "
            "detector processes in one consumer group on a topic of N × P partitions; transactions of up to "
            f"{batch:,} records (growing with the backlog). CPU is summed over the processes. The broker, "
            "the registry and the measuring consumer share the same cores.",
            "",
            "| Processes | Partitions per process | Throughput (tx/s) | CPU ms per 1k tx |",
            "|---:|---:|---:|---:|",
        ]
        for row in scale["rows"]:
            lines.append(
                f"| {row['processes']} | {row['partitions_per_process']} | {_num(row['throughput_tps'])} | "
                f"{_num(row['cpu_ms_per_1k'], 2)} |"
            )
        if scale.get("error"):
            lines.append(f"\nScale run failed: {scale['error']}")
        lines.append("")
    lines += ["**Targets**", ""]
    for target in results.get("targets", []):
        verdict = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        lines.append(f"- {target['name']}: {target['target']}, measured {target['measured'] or '-'}: **{verdict}**")
    for error in results.get("errors", []):
        lines.append(f"- error: {error}")
    return "\n".join(lines) + "\n"


def write_charts(results: dict[str, Any], output_dir: Path, name: str = "latest") -> list[Path]:
    """PNG charts next to the JSON and markdown (see benchmarks/charts.py)."""
    from benchmarks.charts import draw_all

    return draw_all(results, output_dir, name)


def _ratio(ours: float | None, other: float | None) -> float | None:
    # Three significant digits: a ratio far below 1 (a peer against the limit) must not round to 0.
    return float(f"{ours / other:.3g}") if ours and other else None


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _spread(row: dict[str, Any], figure: str) -> str:
    low, high = row[figure + "_range"]
    return f"{_num(row[figure], 1)}" + (f" ({low:,.1f}–{high:,.1f})" if row["runs"] > 1 else "")


def _pinned(package: str) -> str | None:
    """The version benchmarks/quix-requirements.txt pins (the quixstreams contender's environment)."""
    from benchmarks.quix_env import REQUIREMENTS

    for line in REQUIREMENTS.read_text().splitlines():
        if line.lower().startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        return None


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def _kafka_version(settings: Settings) -> str | None:
    """The local stack's Kafka (from infra/pom.xml) when that is what we talk to."""
    from fraudstream.stack import LocalStack

    stack = LocalStack(settings, log=lambda _line: None)
    return stack.kafka_version if settings.bootstrap_servers == stack.bootstrap_servers else None


def _registry_version(settings: Settings) -> str | None:
    """Apicurio tells its version on its own API, next to the Confluent-compatible one."""
    base = settings.schema_registry_url.split("/apis/", 1)[0]
    try:
        with urllib.request.urlopen(f"{base}/apis/registry/v3/system/info", timeout=5) as response:
            info = json.load(response)
        return f"{info.get('name', 'registry')} {info.get('version', '')}".strip()
    except (OSError, ValueError):
        return None
