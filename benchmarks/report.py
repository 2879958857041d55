"""What a benchmark run writes: the machine, the figures, the ratios ours/alternative, the targets.

JSON for tools (benchmarks/results/latest.json), markdown for people (latest.md and the README).
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
# Targets from the issue: ours at least this many times the per-message confluent-kafka detector,
# and this p99 at this rate.
DETECTOR_RATIO_TARGET = 3.0
LATENCY_TARGET_RATE = 2_000
LATENCY_P99_TARGET_MS = 100.0


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


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
            "kafka_broker": _kafka_version(settings),
            "schema_registry": _registry_version(settings),
        },
        "bootstrap_servers": settings.bootstrap_servers,
        "schema_registry_url": settings.schema_registry_url,
    }


def ratios(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """ours / alternative for each figure (above 1: ours is faster, or for memory, bigger)."""
    out: dict[str, dict[str, float | None]] = {}
    for section, figure, name in (("detectors", "throughput_tps", "detector_throughput"),
                                  ("detectors", "peak_rss_mib", "detector_peak_rss"),
                                  ("producers", "throughput_tps", "producer_throughput")):
        entries = results.get(section) or {}
        ours = (entries.get(OURS) or {}).get(figure)
        out[name] = {f"ours/{key}": _ratio(ours, entry.get(figure)) for key, entry in entries.items() if key != OURS}
    return out


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    ratio = results["ratios"]["detector_throughput"].get("ours/confluent_per_message")
    at_rate = next((r for r in (results.get("latency") or {}).get("runs", [])
                    if r["rate_tps"] == LATENCY_TARGET_RATE), None)
    p99 = at_rate["p99_ms"] if at_rate else None
    return [
        {"name": "detector throughput vs per-message confluent-kafka, exactly-once on",
         "target": f">= {DETECTOR_RATIO_TARGET:g}x", "measured": None if ratio is None else f"{ratio:.2f}x",
         "met": None if ratio is None else ratio >= DETECTOR_RATIO_TARGET},
        {"name": f"end-to-end p99 latency at {LATENCY_TARGET_RATE:,} tx/s",
         "target": f"< {LATENCY_P99_TARGET_MS:g} ms", "measured": None if p99 is None else f"{p99:g} ms",
         "met": None if p99 is None else p99 < LATENCY_P99_TARGET_MS},
    ]


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
        f"Measured {results['started_at'][:16].replace('T', ' ')} UTC in one run of `python -m benchmarks` "
        f"({results['duration_s'] / 60:.1f} min{', --quick' if config['quick'] else ''}): "
        f"{m['cpu_count']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, {m['platform']}; "
        f"Python {m['python']}, confluent-kafka {v['confluent_kafka']} (librdkafka {v['librdkafka']}), "
        f"fastavro {v['fastavro']}, kafka-python {v['kafka_python']}; Kafka {v['kafka_broker'] or '?'}, "
        f"schema registry {v['schema_registry'] or '?'}; everything on the same machine.",
        "",
    ]
    detectors = results.get("detectors") or {}
    if detectors:
        ours = (detectors.get(OURS) or {}).get("throughput_tps")
        lines += [
            f"**Detector**: {config['count']:,} pre-filled transactions, from the first routed record until all are "
            "readable by a read_committed consumer; median of the runs (a detector is not run again once its "
            f"runs add up to {config['enough_seconds']:g} s). Ours with batches of at most "
            f"{config['ours_batch_max_records']:,} records or {config['ours_batch_max_ms']} ms, "
            f"{config['ours_decoder']} decoder.",
            "",
            "| Detector | Delivery | Runs | Throughput (tx/s) | Ours ÷ it | Peak RSS (MiB) | CPU ms per 1k tx |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for entry in detectors.values():
            tps = entry.get("throughput_tps")
            lines.append(f"| {entry['label']} | {entry['delivery']} | {len(entry['runs'])} | {_num(tps)} | "
                         f"{_times(_ratio(ours, tps))} | {_num(entry.get('peak_rss_mib'), 1)} | "
                         f"{_num(entry.get('cpu_ms_per_1k'), 1)} |"
                         + (f" failed: {entry['error']}" if entry.get("error") else ""))
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
            lines.append(f"| {entry['label']} | {_num(tps)} | {_times(_ratio(ours, tps))} |"
                         + (f" failed: {entry['error']}" if entry.get("error") else ""))
        lines.append("")
    latency = results.get("latency") or {}
    if latency.get("runs") or latency.get("error"):
        lines += [
            f"**End-to-end latency** (ours, exactly-once): our producer at a fixed rate for "
            f"{config['latency_seconds']:g} s; from a transaction's creation (its event_time) until it is readable "
            "by a read_committed consumer on the legit or fraud topic",
            "",
            "| Rate (tx/s) | Achieved (tx/s) | Records | p50 (ms) | p99 (ms) | max (ms) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for run in latency.get("runs", []):
            lines.append(f"| {run['rate_tps']:,} | {_num(run['achieved_tps'])} | {run['records']:,} | "
                         f"{_num(run['p50_ms'], 1)} | {_num(run['p99_ms'], 1)} | {_num(run['max_ms'], 1)} |")
        if latency.get("runs"):
            lines += [
                "",
                "Where it goes, split at the moment the detector produces the record (its Kafka timestamp):",
                "",
                "| Rate (tx/s) | created → produced by the detector, p50 / p99 (ms) "
                "| produced → readable, p50 / p99 (ms) |",
                "|---:|---:|---:|",
            ]
            for run in latency["runs"]:
                lines.append(f"| {run['rate_tps']:,} | {_num(run['created_to_produced_p50_ms'], 1)} / "
                             f"{_num(run['created_to_produced_p99_ms'], 1)} | "
                             f"{_num(run['produced_to_readable_p50_ms'], 1)} / "
                             f"{_num(run['produced_to_readable_p99_ms'], 1)} |")
        if latency.get("error"):
            lines.append(f"\nLatency run failed: {latency['error']}")
        lines.append("")
    lines += ["**Targets**", ""]
    for target in results.get("targets", []):
        verdict = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        lines.append(f"- {target['name']}: {target['target']}, measured {target['measured'] or '-'}: **{verdict}**")
    for error in results.get("errors", []):
        lines.append(f"- error: {error}")
    return "\n".join(lines) + "\n"


def _ratio(ours: float | None, other: float | None) -> float | None:
    return round(ours / other, 2) if ours and other else None


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


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
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=10)
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


README = PROJECT_ROOT / "README.md"
README_START = "<!-- benchmark results: written by `python -m benchmarks --update-readme` -->"
README_END = "<!-- end of benchmark results -->"


def update_readme(results: dict[str, Any], readme: Path = README) -> bool:
    """Replace the figures between the markers in the README's Benchmarks section; False if the markers are missing."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    readme.write_text(text[:start + len(README_START)] + "\n" + markdown(results) + text[end:])
    return True
