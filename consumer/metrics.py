"""Detector metrics: Prometheus counters (optional HTTP endpoint) and a periodic one-line log."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

COMMIT_BUCKETS_S = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
RESTORE_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass
class DetectorMetrics:
    """Plain totals for the log line and the caller, mirrored into Prometheus metrics."""

    consumed: int = 0
    legit: int = 0
    fraud: int = 0
    dead_lettered: int = 0
    batches: int = 0
    aborts: int = 0
    recoveries: int = 0
    registry_retries: int = 0
    rule_records_refused: int = 0  # rules-topic records this detector read and refused (each logged)
    rules: dict[str, int] = field(default_factory=dict)  # fraud decisions per rule that fired
    shadow_differences: int = 0  # ShadowDifferences written (the shadow rule set decided otherwise)
    state_keys: dict[str, int] = field(default_factory=dict)  # live keys per store, ready partitions
    changelog_records: int = 0
    restored_records: int = 0
    restores: int = 0  # partitions whose state was restored (at assignment, after an abort or a lost producer)
    restoring_records: int = 0  # changelog records still to read (partitions being restored)
    commit_seconds: list[float] = field(default_factory=list)  # since the last log line
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        # A registry per detector: several detectors in one process (tests) must not collide.
        self._consumed = Counter(
            "fraudstream_consumed", "Transactions consumed from the input topic", registry=self.registry
        )
        self._routed = Counter("fraudstream_routed", "Records routed, by route", ["route"], registry=self.registry)
        self._dead = Counter(
            "fraudstream_dead_lettered", "Records dead-lettered, by error kind", ["kind"], registry=self.registry
        )
        self._batches = Counter("fraudstream_batches", "Batches committed", registry=self.registry)
        self._aborts = Counter("fraudstream_aborts", "Transactions aborted (batch re-read)", registry=self.registry)
        self._recoveries = Counter(
            "fraudstream_producer_recoveries",
            "Transactional producers recreated after the broker ended their epoch (no other detector had taken over)",
            registry=self.registry,
        )
        self._registry_retries = Counter(
            "fraudstream_registry_retries",
            "Batch decodes retried because the schema registry did not answer",
            registry=self.registry,
        )
        self._commit = Histogram(
            "fraudstream_commit_seconds",
            "Time to commit a batch's transaction",
            buckets=COMMIT_BUCKETS_S,
            registry=self.registry,
        )
        self._rules = Counter(
            "fraudstream_rule_fired", "Fraud decisions in which a rule fired, by rule", ["rule"], registry=self.registry
        )
        self._state_keys = Gauge(
            "fraudstream_state_keys",
            "Keys held in a state store (this detector's partitions)",
            ["store"],
            registry=self.registry,
        )
        self._changelog = Counter(
            "fraudstream_changelog_records",
            "State changes written to changelogs (rows and tombstones), inside committed or aborted transactions",
            registry=self.registry,
        )
        self._restored = Counter(
            "fraudstream_state_restored_records", "Changelog records read to restore state", registry=self.registry
        )
        self._restoring = Gauge(
            "fraudstream_state_restoring_records",
            "Changelog records still to read for the partitions being restored",
            registry=self.registry,
        )
        self._restore = Histogram(
            "fraudstream_state_restore_seconds",
            "Time to restore a partition's state",
            buckets=RESTORE_BUCKETS_S,
            registry=self.registry,
        )
        self._gate_stalled = Gauge(
            "fraudstream_terminal_gate_stalled_partitions",
            "Input partitions holding up the "
            "terminal window's event-time gate (neither past the batch's event time plus the "
            "tolerance nor at their end)",
            registry=self.registry,
        )
        self._gate_wait = Counter(
            "fraudstream_terminal_gate_wait_seconds",
            "Time batches waited for the terminal window's event-time gate",
            registry=self.registry,
        )
        self._rule_refused = Counter(
            "fraudstream_rule_records_refused",
            "Rules-topic records refused (out of bounds, "
            "undecodable, not the next version, too many rules), by error kind",
            ["kind"],
            registry=self.registry,
        )
        self._shadow = Counter(
            "fraudstream_shadow_differences",
            "Records the shadow rule set decided otherwise than the live one (written to the shadow topic)",
            registry=self.registry,
        )
        self._gate_waited_s = 0.0
        self._last_log = time.monotonic()
        self._consumed_at_last_log = 0

    def rule_refused(self, kind: str) -> None:
        self.rule_records_refused += 1
        self._rule_refused.labels(kind).inc()

    def serve(self, port: int) -> None:
        start_http_server(port, addr="0.0.0.0", registry=self.registry)

    def batch_committed(
        self,
        *,
        consumed: int,
        legit: int,
        fraud: int,
        dead_kinds: dict[str, int],
        commit_s: float,
        rules: dict[str, int] | None = None,
        shadow_differences: int = 0,
    ) -> None:
        dead = sum(dead_kinds.values())
        self.shadow_differences += shadow_differences
        self._shadow.inc(shadow_differences)
        for rule, count in (rules or {}).items():
            self.rules[rule] = self.rules.get(rule, 0) + count
            self._rules.labels(rule).inc(count)
        self.consumed += consumed
        self.legit += legit
        self.fraud += fraud
        self.dead_lettered += dead
        self.batches += 1
        self.commit_seconds.append(commit_s)
        self._consumed.inc(consumed)
        self._routed.labels("legit").inc(legit)
        self._routed.labels("fraud").inc(fraud)
        self._routed.labels("dead_letter").inc(dead)
        for kind, count in dead_kinds.items():
            self._dead.labels(kind).inc(count)
        self._batches.inc()
        self._commit.observe(commit_s)

    def state_size(self, keys: dict[str, int]) -> None:
        self.state_keys = keys
        for store, count in keys.items():
            self._state_keys.labels(store).set(count)

    def terminal_gate(self, stats) -> None:
        """The terminal window's gate (stats: fraudstream.consumer.terminal.GateStats, cumulative)."""
        self._gate_stalled.set(len(stats.stalled))
        self._gate_wait.inc(max(0.0, stats.waited_s - self._gate_waited_s))
        self._gate_waited_s = stats.waited_s

    def changelog_written(self, records: int) -> None:
        self.changelog_records += records
        self._changelog.inc(records)

    def restored(self, progress, seconds: float) -> None:
        """A partition's state is restored (progress: fraudstream.consumer.state.recovery.RestoreProgress)."""
        self.restored_records += progress.records
        self.restores += 1
        self._restored.inc(progress.records)
        self._restore.observe(seconds)

    def restoring(self, remaining_records: int) -> None:
        self.restoring_records = remaining_records
        self._restoring.set(remaining_records)

    def aborted(self) -> None:
        self.aborts += 1
        self._aborts.inc()

    def recovered(self) -> None:
        self.recoveries += 1
        self._recoveries.inc()

    def registry_retried(self) -> None:
        self.registry_retries += 1
        self._registry_retries.inc()

    def line_due(self, interval_s: float) -> bool:
        return time.monotonic() - self._last_log >= interval_s

    def line(self) -> str:
        """One line: totals, rate since the last line, commit latency percentiles since the last line."""
        now = time.monotonic()
        rate = (self.consumed - self._consumed_at_last_log) / max(now - self._last_log, 1e-9)
        commits = sorted(self.commit_seconds)
        p50 = commits[len(commits) // 2] * 1000 if commits else 0.0
        p99 = commits[min(len(commits) - 1, int(len(commits) * 0.99))] * 1000 if commits else 0.0
        self._last_log, self._consumed_at_last_log, self.commit_seconds = now, self.consumed, []
        line = (
            f"consumed={self.consumed} legit={self.legit} fraud={self.fraud} dead_lettered={self.dead_lettered} "
            f"batches={self.batches} aborts={self.aborts} recoveries={self.recoveries} rate={rate:.0f}/s "
            f"commit_ms p50={p50:.1f} p99={p99:.1f}"
        )
        if self.state_keys:
            keys = " ".join(f"{store}={count}" for store, count in self.state_keys.items())
            line += f" state_keys {keys} changelog={self.changelog_records} restored={self.restored_records} restores={self.restores}"
            if self.restoring_records:
                line += f" restoring={self.restoring_records}"
        if self.shadow_differences:
            line += f" shadow_differences={self.shadow_differences}"
        if self.rules:
            line += " rules " + " ".join(f"{rule}={count}" for rule, count in sorted(self.rules.items()))
        return line
