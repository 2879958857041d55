"""Issue #21: the default (stateful) detector's CPU per record, before the engine redesign and now, in one run.

    python -m benchmarks.engine_before_after [--count 100000] [--rounds 2] [--startup-count 1000]

"Before" is commit b53b134 (round 2's final engine, the last commit before the redesign), checked out as a
detached git worktree in .bench/engine-before with a virtual environment of its own, made by that tree's own
`make .venv/.installed` with this tree's constraints.txt (PIP_CONSTRAINT: that commit has no lock file of its
own), so both sides run the same confluent-kafka, fastavro, pyarrow, numpy. Both are made once and reused.
"After" is this working tree, run by this interpreter.

Each run gets a fresh input topic (and group), its schemas registered by that side's own `fraudstream schemas
register`, then by today's (the pre-fill looks up today's: a newer Label, the new ShadowDifference), and the same
seeded transactions (benchmarks/data.py's pre-fill, written by this tree: the
Transaction schema is the same on both sides, and a run with a dead letter fails). Then that side's detector
runs as a process of its own, from its own tree, with its defaults (stateful, its own rules file), until a
read_committed reader has seen every record on the legit, fraud and dead-letter topics (held records come out
later); then SIGTERM, and its CPU (user + system, every thread) comes from wait4.

That CPU includes start-up (imports, the group join, restoring empty state) and shutdown, the same for both
sides: a run of --startup-count records per side and round measures it, and the "net" figure subtracts it,
run by run: (CPU of the full run - CPU of the small one) / (count - startup count). The "window" figure is the
CPU from the first output readable to the last (/proc/<pid>/stat), as `make bench` counts it. Sides alternate
within each round; medians over rounds. Wall times on a loaded machine mostly measure the other load: the CPU
ratio after / before is the figure to read. Writes benchmarks/results/engine_before_after.json. Needs the stack
(KAFKA_BOOTSTRAP_SERVERS, SCHEMA_REGISTRY_URL).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.data import prefill
from benchmarks.harness import Contender, OutputCounter, RunFailed, count_until, unique
from benchmarks.report import machine
from fraudstream.kafka import admin, ensure_topics
from fraudstream.registry import register_all
from fraudstream.settings import PROJECT_ROOT, Settings

BEFORE_COMMIT = "b53b134"
BENCH_DIR = PROJECT_ROOT / ".bench"  # git-ignored
BEFORE_TREE = BENCH_DIR / "engine-before"
LOG_DIR = BENCH_DIR / "engine-logs"
RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "engine_before_after.json"
SEED = 7
STALL_TIMEOUT_S = 120.0
SIDES = ("before", "after")


@dataclass(frozen=True, slots=True)
class Side:
    name: str
    tree: Path
    python: Path
    commit: str


def _git(*args: str, cwd: Path = PROJECT_ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def before_side(log: Any = print) -> Side:
    """The worktree of BEFORE_COMMIT with its installed virtual environment, made on first use."""
    commit = _git("rev-parse", f"{BEFORE_COMMIT}^{{commit}}")
    if not (BEFORE_TREE / ".git").exists():
        log(f"creating the worktree of {BEFORE_COMMIT} in {BEFORE_TREE}")
        BENCH_DIR.mkdir(exist_ok=True)
        _git("worktree", "add", "--detach", str(BEFORE_TREE), commit)
    elif _git("rev-parse", "HEAD", cwd=BEFORE_TREE) != commit:
        raise SystemExit(
            f"{BEFORE_TREE} is not at {BEFORE_COMMIT}: remove it (git worktree remove --force {BEFORE_TREE})"
        )
    if not (BEFORE_TREE / ".venv" / ".installed").exists():
        log(f"installing {BEFORE_COMMIT} into {BEFORE_TREE / '.venv'} (its own make .venv/.installed)")
        env = {**os.environ, "PIP_CONSTRAINT": str(PROJECT_ROOT / "constraints.txt")}
        done = subprocess.run(["make", ".venv/.installed"], cwd=BEFORE_TREE, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"installing {BEFORE_COMMIT} failed: {(done.stderr or done.stdout).strip()[-2000:]}")
    return Side("before", BEFORE_TREE, BEFORE_TREE / ".venv" / "bin" / "python", commit)


def after_side() -> Side:
    return Side("after", PROJECT_ROOT, Path(sys.executable), _git("describe", "--always", "--dirty"))


def child_env(settings: Settings) -> dict[str, str]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "SCHEMA_REGISTRY_URL": settings.schema_registry_url,
    }
    env.pop("PYTHONPATH", None)  # each side imports its own tree only
    return env


def probe(side: Side, settings: Settings) -> dict[str, str]:
    """The versions a side runs, and proof that its detector's code is its own tree's (python -m puts the
    working directory first on sys.path: each side runs from its own tree)."""
    code = (
        "import json, confluent_kafka, fastavro, fraudstream.consumer.detector as d;"
        "print(json.dumps({'detector': d.__file__, 'confluent_kafka': confluent_kafka.__version__,"
        "'librdkafka': confluent_kafka.libversion()[0], 'fastavro': fastavro.__version__}))"
    )
    done = subprocess.run(
        [str(side.python), "-c", code], cwd=side.tree, env=child_env(settings), capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{side.name}: {side.python} cannot import its detector: {done.stderr.strip()[-500:]}")
    found = json.loads(done.stdout)
    if not Path(found["detector"]).resolve().is_relative_to(side.tree.resolve()):
        raise SystemExit(f"{side.name}: the detector imported is {found['detector']}, not from {side.tree}")
    return found


def run_side(side: Side, base: Settings, count: int, label: str) -> dict[str, Any]:
    """One detector run of `side` on `count` fresh pre-filled records: its CPU, wall time and outputs."""
    settings = base.replace(transactions_topic=unique("bench-engine"), group_id=unique("bench-engine"))
    env = child_env(settings)
    ensure_topics(settings)  # today's topics: a superset of the old detector's (the shadow topic is new)
    registered = subprocess.run(
        [str(side.python), "-m", "fraudstream.cli", "schemas", "register", "--topic", settings.transactions_topic],
        cwd=side.tree,
        env=env,
        capture_output=True,
        text=True,
    )
    if registered.returncode != 0:
        raise RunFailed(f"{side.name}: fraudstream schemas register failed: {registered.stderr.strip()[-500:]}")
    # Then today's schemas (the pre-fill looks them all up): for "before", today's Label and ShadowDifference
    # come after its own as later versions of the same subjects; the Transaction schema is the same on both.
    register_all(settings)
    prefill(settings, count=count, seed=SEED, json_topic=None)
    topics = [settings.legit_topic, settings.fraud_topic, settings.dlq_topic]
    counter = OutputCounter(settings, topics)
    argv = [
        str(side.python),
        "-m",
        "fraudstream.consumer",
        "--topic",
        settings.transactions_topic,
        "--group-id",
        settings.group_id,
        "--transactional-id",
        f"{settings.group_id}-1",
    ]
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    detector = Contender(f"{side.name}-{label}-{settings.group_id}", argv, LOG_DIR, cwd=side.tree, env=env)
    try:
        # A generous bound: well under a minute per 100,000 records when the machine is quiet.
        routed = count_until(counter, detector, count, stall_timeout_s=STALL_TIMEOUT_S, deadline_s=120 + count / 200)
    finally:
        exited = detector.stop()
        counter.close()
    if routed.by_topic[settings.dlq_topic]:
        raise RunFailed(f"{side.name}: {routed.by_topic[settings.dlq_topic]} dead letters (see {detector.log_path})")
    if routed.total != count:
        raise RunFailed(f"{side.name}: {routed.total} outputs for {count} records")
    # The stateful path ran: its changelog topics (named the same way on both sides) exist.
    prefix = settings.changelog_topic("")[: -len(".changelog")]
    changelogs = sorted(t for t in admin(settings).list_topics(timeout=10).topics if t.startswith(prefix))
    if not changelogs:
        raise RunFailed(f"{side.name}: no changelog topic {prefix}*: the detector did not run stateful")
    return {
        "count": count,
        "legit": routed.by_topic[settings.legit_topic],
        "fraud": routed.by_topic[settings.fraud_topic],
        "cpu_s": round(exited.cpu_s, 3),
        "wall_s": round(routed.done_s - detector.started, 3),
        "window_cpu_s": None if routed.window_cpu_s is None else round(routed.window_cpu_s, 3),
        "window_count": count - routed.count_at_first,
        "peak_rss_mib": round(exited.peak_rss_kib / 1024, 1),
        "exit_code": exited.exit_code,
        "changelog_topics": len(changelogs),
    }


def summary(full: list[dict], small: list[dict]) -> dict[str, Any]:
    """Medians over rounds of one side's figures; the net figure pairs each round's full and small runs."""
    raw = [r["cpu_s"] * 1e6 / r["count"] for r in full]
    window = [r["window_cpu_s"] * 1e6 / r["window_count"] for r in full if r["window_cpu_s"] and r["window_count"]]
    result: dict[str, Any] = {
        "cpu_ms_per_1k": statistics.median(raw),
        "window_cpu_ms_per_1k": statistics.median(window) if window else None,
        "wall_s": statistics.median(r["wall_s"] for r in full),
        "records_per_wall_s": statistics.median(r["count"] / r["wall_s"] for r in full),
        "fraud": sorted({r["fraud"] for r in full}),
        "runs": full,
    }
    if small:
        net = [(f["cpu_s"] - s["cpu_s"]) * 1e6 / (f["count"] - s["count"]) for f, s in zip(full, small)]
        result |= {
            "startup_cpu_s": statistics.median(s["cpu_s"] for s in small),
            "startup_share": statistics.median(s["cpu_s"] / f["cpu_s"] for f, s in zip(full, small)),
            "net_cpu_ms_per_1k": statistics.median(net),
            "startup_runs": small,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--startup-count", type=int, default=1_000, help="records of the start-up runs (0: none, no net figure)"
    )
    parser.add_argument(
        "--sides", nargs="+", choices=SIDES, default=list(SIDES), help="both (default), or one (a smoke run)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not 0 <= args.startup_count < args.count:
        parser.error("--startup-count must be below --count")
    base = Settings.from_env()
    sides = {name: before_side() if name == "before" else after_side() for name in args.sides}
    versions = {name: probe(side, base) for name, side in sides.items()}
    environment = machine(base)
    libraries = {(v["confluent_kafka"], v["librdkafka"], v["fastavro"]) for v in versions.values()}
    if len(libraries) > 1:
        print(f"warning: the sides run different client libraries: {versions}", file=sys.stderr)
    full: dict[str, list[dict]] = {name: [] for name in sides}
    small: dict[str, list[dict]] = {name: [] for name in sides}
    for round_ in range(args.rounds):
        for name in list(sides) if round_ % 2 == 0 else reversed(list(sides)):
            if args.startup_count:
                small[name].append(run_side(sides[name], base, args.startup_count, "startup"))
            full[name].append(run_side(sides[name], base, args.count, "full"))
            print(f"round {round_ + 1} {name}: {full[name][-1]['cpu_s']:.1f} s CPU, {full[name][-1]['wall_s']:.1f} s")
    figures = {name: summary(full[name], small[name]) for name in sides}
    report: dict[str, Any] = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "count": args.count,
        "startup_count": args.startup_count,
        "rounds": args.rounds,
        "seed": SEED,
        "sides": {
            name: {"commit": side.commit, "tree": str(side.tree), **versions[name], **figures[name]}
            for name, side in sides.items()
        },
        "machine": environment,
    }
    if len(sides) == 2:
        before, after = figures["before"], figures["after"]
        report["ratios_after_before"] = {
            key: after[key] / before[key]
            for key in ("cpu_ms_per_1k", "net_cpu_ms_per_1k", "window_cpu_ms_per_1k", "wall_s")
            if (before.get(key) or 0) > 0 and (after.get(key) or 0) > 0
        }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['count']:,} records, {report['rounds']} rounds, medians; CPU = user + system of the detector")
    print(f"{'side':<8} {'commit':<14} {'CPU ms/1k':>10} {'net':>8} {'window':>8} {'start-up':>14} {'wall s':>8}")
    for name, side in report["sides"].items():
        startup = f"{side['startup_cpu_s']:.1f}s ({side['startup_share']:.0%})" if "startup_cpu_s" in side else "-"
        net = f"{side['net_cpu_ms_per_1k']:.1f}" if "net_cpu_ms_per_1k" in side else "-"
        window = f"{side['window_cpu_ms_per_1k']:.1f}" if side["window_cpu_ms_per_1k"] else "-"
        print(
            f"{name:<8} {side['commit'][:12]:<14} {side['cpu_ms_per_1k']:>10.1f} {net:>8} {window:>8} "
            f"{startup:>14} {side['wall_s']:>8.1f}"
        )
    for key, ratio in report.get("ratios_after_before", {}).items():
        print(f"after / before, {key}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
