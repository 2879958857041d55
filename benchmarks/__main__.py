"""Benchmark fraudstream against the usual ways, in one run on one broker: `python -m benchmarks`.

Sections (all by default):
  detectors  throughput of three detectors over the same pre-filled transactions, and their peak RSS
  producers  unthrottled producer throughput, ours vs per-message AvroSerializer
  latency    end-to-end latency of ours at fixed rates (p50, p99, max), several runs each
  scale      our detector's cost per record at 1 to 4 partitions per process, with 1 and 2 processes
Detectors include the limit (a bare exactly-once passthrough) and quixstreams, which runs in its own
virtual environment (.venv-quix, created on first use from benchmarks/quix-requirements.txt).
Writes <output-dir>/latest.json, latest.md and PNG charts, and prints the markdown. Exit status 1 if
any part failed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.data import VELOCITY_GAP_MS, VELOCITY_MAX
from benchmarks.harness import RunFailed, unique
from benchmarks.quix_env import DEFAULT_VENV as DEFAULT_QUIX_VENV
from fraudstream.errors import ConfigError, FraudstreamError
from fraudstream.kafka import admin, ensure_topics, wait_for_cluster
from fraudstream.registry import Registry, register_all
from fraudstream.settings import PROJECT_ROOT, Settings

SECTIONS = ("detectors", "producers", "latency", "scale")
RESULTS_DIR = PROJECT_ROOT / "benchmarks" / "results"
QUICK_DIR = PROJECT_ROOT / "build" / "bench-quick"  # quick figures mean nothing: never over the committed ones
QUICK = {
    "count": 2_000,
    "producer_count": 2_000,
    "runs": 1,
    "latency_seconds": 2.0,
    "latency_runs": 1,
    "scale_count": 2_000,
    "scale_partitions": "1",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--count", type=int, default=500_000, help="transactions pre-filled for the detectors")
    parser.add_argument("--producer-count", type=int, default=200_000, help="transactions per producer run")
    parser.add_argument(
        "--runs",
        type=int,
        default=3,
        help="runs per contender, median reported; a detector is not run again once its runs "
        "add up to --enough-seconds of measurement",
    )
    parser.add_argument(
        "--enough-seconds",
        type=float,
        default=60.0,
        help="measured seconds after which a detector's result stands (default 60)",
    )
    parser.add_argument("--latency-rates", default="2000,10000", help="comma-separated transactions/s")
    parser.add_argument("--latency-seconds", type=float, default=20.0, help="seconds at each rate")
    parser.add_argument("--latency-runs", type=int, default=3, help="runs at each rate (rates alternate)")
    parser.add_argument("--scale-count", type=int, default=200_000, help="transactions per scale configuration")
    parser.add_argument("--scale-partitions", default="1,2,3,4", help="partitions per detector process to try")
    parser.add_argument("--scale-processes", default="1,2", help="detector processes to try")
    parser.add_argument("--batch-max-records", type=int, help="our detector's batch bound (default: its setting)")
    parser.add_argument("--batch-max-ms", type=int, help="our detector's batch time bound (default: its setting)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one more detector run and one more latency run of ours under pyinstrument (not "
        "counted): <output-dir>/profile-ours-detector.txt and profile-ours-latency.txt",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--quix-venv",
        type=Path,
        default=DEFAULT_QUIX_VENV,
        help="quixstreams' own virtual environment, created from benchmarks/quix-requirements.txt "
        "on first use (default .venv-quix)",
    )
    parser.add_argument("--no-quix", action="store_true", help="leave the quixstreams contenders out")
    parser.add_argument(
        "--velocity-max",
        type=int,
        default=VELOCITY_MAX,
        help=f"the velocity rule: more transactions than this in one card's session (payments at "
        f"most {VELOCITY_GAP_MS // 60_000} minutes of event time apart) is fraud "
        f"(default {VELOCITY_MAX})",
    )
    parser.add_argument("--detectors", help="comma-separated subset of the detectors to run (default: all)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny counts, one run, 2 s per rate: checks that the benchmark works, measures nothing",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        help=f"default {RESULTS_DIR.relative_to(PROJECT_ROOT)}, with --quick {QUICK_DIR.relative_to(PROJECT_ROOT)}",
    )
    parser.add_argument(
        "--keep-topics", action="store_true", help="do not delete the topics (and schema subjects) the run created"
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep every contender's output (kept anyway when something failed)"
    )
    parser.add_argument("--bootstrap-servers", help="Kafka bootstrap servers [KAFKA_BOOTSTRAP_SERVERS]")
    parser.add_argument("--schema-registry-url", help="Confluent-compatible Schema Registry URL [SCHEMA_REGISTRY_URL]")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    if args.output_dir is None:
        args.output_dir = QUICK_DIR if args.quick else RESULTS_DIR
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    try:
        settings = Settings.from_env(
            bootstrap_servers=args.bootstrap_servers, schema_registry_url=args.schema_registry_url
        )
        wait_for_cluster(settings)
        results = Benchmark(settings, args, sections).run()
    except FraudstreamError as exc:
        print(f"benchmarks: error: {exc}", file=sys.stderr)
        return exc.exit_code
    json_path, md_path = report.write(results, args.output_dir)
    charts = report.write_charts(results, args.output_dir)
    print(report.markdown(results))
    print(f"wrote {json_path}, {md_path} and {', '.join(path.name for path in charts) or 'no charts'}")
    return 1 if results["errors"] else 0


class Benchmark:
    def __init__(self, settings: Settings, args: argparse.Namespace, sections: list[str]) -> None:
        self.settings = settings
        self.args = args
        self.sections = sections
        self.run_id = unique("bench")
        self.created_topics: list[str] = []
        self.registered_subjects: list[str] = []
        self.log_dir = Path(tempfile.mkdtemp(prefix="fraudstream-bench-"))
        self.errors: list[str] = []

    def run(self) -> dict[str, Any]:
        args = self.args
        started = time.perf_counter()
        results: dict[str, Any] = {
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": report.machine(self.settings),
            "config": {
                "quick": args.quick,
                "count": args.count,
                "producer_count": args.producer_count,
                "runs": args.runs,
                "enough_seconds": args.enough_seconds,
                "latency_rates": self.rates,
                "latency_seconds": args.latency_seconds,
                "latency_runs": args.latency_runs,
                "scale_count": args.scale_count,
                "scale_partitions": _ints(args.scale_partitions),
                "scale_processes": _ints(args.scale_processes),
                "seed": args.seed,
                "partitions": self.settings.partitions,
                "fraud_threshold_cents": self.settings.fraud_threshold_cents,
                "ours_batch_max_records": args.batch_max_records or self.settings.batch_max_records,
                "ours_batch_max_ms": args.batch_max_ms or self.settings.batch_max_ms,
                "ours_decoder": self.settings.decoder,
                "velocity_gap_s": VELOCITY_GAP_MS / 1000,
                "velocity_max": args.velocity_max,
                "sections": self.sections,
            },
        }
        try:
            if "detectors" in self.sections:
                results["prefill"], results["detectors"] = self.detectors()
            if "producers" in self.sections:
                results["producers"] = self.producers()
            if "latency" in self.sections:
                results["latency"] = self.latency()
            if "scale" in self.sections:
                results["scale"] = self.scale()
        finally:
            self.cleanup()
        results["ratios"] = report.ratios(results)
        results["targets"] = report.targets(results)
        results["errors"] = self.errors
        results["logs"] = str(self.log_dir) if self.errors or self.args.keep_logs else None
        results["duration_s"] = round(time.perf_counter() - started, 1)
        return results

    @property
    def rates(self) -> list[int]:
        return [int(r) for r in self.args.latency_rates.split(",") if r.strip()]

    def topics_for(self, suffix: str, *, register: bool = True, partitions: int | None = None) -> Settings:
        """Settings for a fresh input topic and its derived topics, created (and their schemas registered)."""
        settings = self.settings.replace(
            transactions_topic=f"{self.run_id}-{suffix}", partitions=partitions or self.settings.partitions
        )
        ensure_topics(settings)
        self.created_topics += settings.all_topics
        if register:
            self.registered_subjects += list(register_all(settings))  # subject -> id
        return settings

    # ----- sections -----
    def detectors(self) -> tuple[dict, dict]:
        from benchmarks.data import prefill
        from benchmarks.detectors import (
            LARGE_AMOUNT,
            OWN_RULES,
            PASSTHROUGH_BEST_SIZES,
            QUIX,
            QUIX_VELOCITY,
            VELOCITY,
            detector_specs,
            passthrough_key,
            put_rules_in_force,
            run_detector,
            velocity_rules,
        )

        args = self.args
        wanted = {name.strip() for name in args.detectors.split(",")} if args.detectors else None
        quix_python = self.quix_python(wanted is None or bool(wanted & {QUIX, QUIX_VELOCITY}))
        our_batch = args.batch_max_records or self.settings.batch_max_records
        avro, json_in = self.topics_for("avro"), self.topics_for("json", register=False)
        output_keys = [passthrough_key(b) for b in dict.fromkeys((our_batch, *PASSTHROUGH_BEST_SIZES))]
        output_keys.append(passthrough_key(our_batch, produce_batch=True))
        output_keys += ["confluent_per_message"] + ([QUIX, QUIX_VELOCITY] if quix_python else [])
        outputs = {key: self.topics_for(key.replace("_", "-")) for key in output_keys}
        self.log(f"pre-filling {args.count:,} transactions (Avro and JSON copies) ...")
        filled = prefill(
            avro,
            count=args.count,
            seed=args.seed,
            json_topic=json_in.transactions_topic,
            velocity_max=args.velocity_max,
        )
        self.log(
            f"  done in {filled.elapsed_s:.1f}s; {filled.fraud:,} above the threshold, "
            f"{filled.velocity_fraud:,} by the velocity rule"
        )
        rules_file = self.log_dir / "velocity-rules.toml"
        rules_file.write_text(velocity_rules(args.velocity_max))
        specs = detector_specs(
            avro,
            outputs,
            json_in,
            our_batch=our_batch,
            quix_python=quix_python,
            velocity_max=args.velocity_max,
            velocity_rules_file=rules_file,
        )
        if wanted:
            if unknown := wanted - {spec.key for spec in specs}:
                raise ConfigError(f"unknown detectors: {', '.join(sorted(unknown))}")
            specs = [spec for spec in specs if spec.key in wanted]
        expected_fraud = {LARGE_AMOUNT: filled.fraud, VELOCITY: filled.velocity_fraud, None: 0}
        runs: dict[str, list] = {spec.key: [] for spec in specs}
        failed: dict[str, str] = {}
        for round_number in range(args.runs):
            # Interleaved rounds: background noise is shared by all contenders, not piled on one.
            for spec in specs:
                measured = sum(r.window_s for r in runs[spec.key])
                if spec.key in failed or (runs[spec.key] and measured >= args.enough_seconds):
                    continue
                self.log(f"detector {spec.key}, run {round_number + 1} ...")
                try:
                    put_rules_in_force(spec, avro)
                    result = run_detector(
                        spec,
                        avro,
                        run=round_number,
                        expected=args.count,
                        log_dir=self.log_dir,
                        batch_max_records=args.batch_max_records if spec.key == "ours" else None,
                        batch_max_ms=args.batch_max_ms if spec.key == "ours" else None,
                    )
                except (RunFailed, TimeoutError, FraudstreamError) as exc:
                    failed[spec.key] = str(exc)
                    self.errors.append(f"detector {spec.key}: {exc}")
                    continue
                if spec.rule != OWN_RULES and result.fraud != expected_fraud[spec.rule]:
                    self.errors.append(
                        f"detector {spec.key} run {round_number}: {result.fraud} on the fraud topic, "
                        f"its rule says {expected_fraud[spec.rule]}"
                    )
                self.log(
                    f"  {result.throughput_tps:,.0f} tx/s, {result.cpu_ms_per_1k:.1f} ms CPU per 1k, "
                    f"peak RSS {result.peak_rss_mib} MiB"
                )
                runs[spec.key].append(result)
        if args.profile:
            self.profile(specs[0] if specs[0].key == "ours" else None, avro, expected=args.count)
        summary = {}
        for spec in specs:
            done = runs[spec.key]
            summary[spec.key] = {
                "label": spec.label,
                "delivery": spec.delivery,
                "rule": spec.rule,
                "limit": spec.is_limit,
                "batch": spec.batch if spec.is_limit else (our_batch if spec.key == "ours" else None),
                "produce_batch": spec.produce_batch,
                "throughput_tps": report.median([r.throughput_tps for r in done]),
                "peak_rss_mib": report.median([r.peak_rss_mib for r in done]),
                "cpu_ms_per_1k": report.median([r.cpu_ms_per_1k for r in done], digits=2),
                "runs": [r.to_json() for r in done],
                "error": failed.get(spec.key),
            }
        return {
            "count": filled.count,
            "fraud": filled.fraud,
            "velocity_fraud": filled.velocity_fraud,
            "elapsed_s": round(filled.elapsed_s, 1),
        }, summary

    def quix_python(self, needed: bool) -> str | None:
        """The quixstreams environment's Python (created on first use), or None when not needed or --no-quix."""
        from benchmarks.quix_env import ensure_venv

        if not needed or self.args.no_quix:
            return None
        return str(ensure_venv(self.args.quix_venv, log=self.log))

    def profile(self, ours, avro: Settings, *, expected: int) -> None:
        from benchmarks.detectors import run_detector

        if ours is None:
            return
        path = self.args.output_dir / "profile-ours-detector.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.log(f"detector ours under pyinstrument -> {path} ...")
        try:
            run_detector(
                ours,
                avro,
                run=0,
                expected=expected,
                log_dir=self.log_dir,
                profile_to=path,
                batch_max_records=self.args.batch_max_records,
                batch_max_ms=self.args.batch_max_ms,
            )
        except (RunFailed, TimeoutError, FraudstreamError) as exc:
            self.errors.append(f"profile: {exc}")

    def producers(self) -> dict:
        from benchmarks.producers import PRODUCERS, run_producer

        args = self.args
        targets = {key: self.topics_for(f"produce-{key.replace('_', '-')}") for key in PRODUCERS}
        runs: dict[str, list] = {key: [] for key in PRODUCERS}
        failed: dict[str, str] = {}
        for round_number in range(args.runs):
            for key in PRODUCERS:
                if key in failed:
                    continue
                self.log(f"producer {key}, run {round_number + 1} ...")
                try:
                    result = run_producer(
                        key,
                        targets[key],
                        run=round_number,
                        count=args.producer_count,
                        seed=args.seed,
                        log_dir=self.log_dir,
                    )
                except (RunFailed, TimeoutError) as exc:
                    failed[key] = str(exc)
                    self.errors.append(f"producer {key}: {exc}")
                    continue
                self.log(f"  {result.throughput_tps:,.0f} tx/s")
                runs[key].append(result)
        return {
            key: {
                "label": label,
                "throughput_tps": report.median([r.throughput_tps for r in runs[key]]),
                "runs": [r.to_json() for r in runs[key]],
                "error": failed.get(key),
            }
            for key, label in PRODUCERS.items()
        }

    def latency(self) -> dict:
        from benchmarks.latency import measure_latency

        args = self.args
        batch = {"batch_max_records": args.batch_max_records, "batch_max_ms": args.batch_max_ms}
        self.log(f"latency at {', '.join(f'{r:,}' for r in self.rates)} tx/s, {args.latency_seconds:g}s each ...")
        try:
            runs, peak_rss = measure_latency(
                self.topics_for("latency"),
                rates=self.rates,
                seconds=args.latency_seconds,
                rounds=args.latency_runs,
                seed=args.seed,
                log_dir=self.log_dir,
                **batch,
            )
        except (RunFailed, TimeoutError, FraudstreamError) as exc:
            self.errors.append(f"latency: {exc}")
            return {"detector": "ours", "runs": [], "error": str(exc)}
        for run in runs:
            self.log(f"  {run.rate_tps:,} tx/s: p50 {run.p50_ms} ms, p99 {run.p99_ms} ms, max {run.max_ms} ms")
        if args.profile:
            path = args.output_dir / "profile-ours-latency.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            rate = report.LATENCY_TARGET_RATE
            self.log(f"latency at {rate:,} tx/s with the detector under pyinstrument -> {path} ...")
            try:
                measure_latency(
                    self.topics_for("latency-profile"),
                    rates=[rate],
                    seconds=args.latency_seconds,
                    seed=args.seed,
                    log_dir=self.log_dir,
                    profile_to=path,
                    **batch,
                )
            except (RunFailed, TimeoutError, FraudstreamError) as exc:
                self.errors.append(f"latency profile: {exc}")
        return {
            "detector": "ours",
            "runs": [r.to_json() for r in runs],
            "detector_peak_rss_mib": peak_rss,
            "error": None,
        }

    def scale(self) -> dict:
        """Our detector as the work grows: P partitions per process, N processes in one group (N*P partitions)."""
        from benchmarks.data import prefill
        from benchmarks.detectors import DetectorSpec, Topics, run_detector

        args = self.args
        batch = args.batch_max_records or self.settings.batch_max_records
        rows, failed = [], None
        for processes in _ints(args.scale_processes):
            for per_process in _ints(args.scale_partitions):
                partitions = processes * per_process
                settings = self.topics_for(f"scale-{processes}x{per_process}", partitions=partitions)
                filled = prefill(settings, count=args.scale_count, seed=args.seed, json_topic=None)
                spec = DetectorSpec("ours", "ours", "exactly-once", Topics.derived(settings))
                self.log(f"scale: {processes} detector(s) x {per_process} partition(s), {args.scale_count:,} ...")
                try:
                    run = run_detector(
                        spec,
                        settings,
                        run=0,
                        expected=args.scale_count,
                        log_dir=self.log_dir,
                        processes=processes,
                        batch_max_records=args.batch_max_records,
                        batch_max_ms=args.batch_max_ms,
                    )
                except (RunFailed, TimeoutError, FraudstreamError) as exc:
                    failed = f"{processes}x{per_process}: {exc}"
                    self.errors.append(f"scale {failed}")
                    break
                if run.fraud != filled.fraud:
                    self.errors.append(
                        f"scale {processes}x{per_process}: {run.fraud} on the fraud topic, the rule says {filled.fraud}"
                    )
                cpu = run.cpu_ms_per_1k
                self.log(f"  {run.throughput_tps:,.0f} tx/s, {cpu:.1f} ms CPU per 1k")
                rows.append(
                    {
                        "processes": processes,
                        "partitions_per_process": per_process,
                        "partitions": partitions,
                        "batch_max_records": batch,
                        "throughput_tps": run.throughput_tps,
                        "cpu_ms_per_1k": round(cpu, 2),
                        "run": run.to_json(),
                    }
                )
        return {"count": args.scale_count, "rows": rows, "error": failed}

    # ----- housekeeping -----
    def cleanup(self) -> None:
        if self.errors or self.args.keep_logs:
            self.log(f"contenders' output kept in {self.log_dir}")
        else:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        if self.args.keep_topics:
            return
        # The shared broker and registry keep nothing of ours: hundreds of MB of records otherwise.
        registry = Registry(self.settings)
        for subject in self.registered_subjects:
            try:
                registry.client.delete_subject(subject)
                registry.client.delete_subject(subject, permanent=True)
            except Exception as exc:  # noqa: BLE001 - a leftover subject is harmless: say so, go on
                self.log(f"could not delete subject {subject}: {exc}")
        client = admin(self.settings)  # held until the futures resolve: a collected client fails them
        # Also what contenders made for themselves (quixstreams' changelogs and repartition topics):
        # their consumer groups, hence those topics' names, start with one of our topics' names.
        try:
            made = [t for t in client.list_topics(timeout=10).topics if self.run_id in t]
        except Exception as exc:  # noqa: BLE001 - a leftover topic is harmless: say so, go on
            self.log(f"could not list topics: {exc}")
            made = []
        if not (topics := sorted(set(self.created_topics) | set(made))):
            return
        futures = client.delete_topics(topics, operation_timeout=30)
        for topic, future in futures.items():
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - a leftover topic is harmless: say so, go on
                self.log(f"could not delete topic {topic}: {exc}")

    @staticmethod
    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    sys.exit(main())
