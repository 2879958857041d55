"""The stateful decide stage: decode a batch, compute each card's features from its state, run the rules,
encode the outputs.

The batch is decoded first, completely (a registry outage raises before any state changes, so a retried
batch is never counted twice). Valid records, whichever decoder path read them, become one set of
columns in offset order; each input partition's rows then go through the card features with that
partition's tables; the rules run on the whole batch's columns. Legit records written with the current
schema are forwarded byte for byte, others re-encoded; fraud records become FraudAlerts naming the rules
that fired.

Every routed record gets a risk score, computed for the whole batch on arrays: with a model (`detect
--model`), the model's fraud probability over `model.model_features` (the same function `fraudstream
train` builds its training set with), and a record at or above the model's threshold goes to fraud too
(rule name `model`); without one, `model.rules_score` (1.0 when a rule fired, else 0.0). A FraudAlert
carries it in its `score` field, a legit record (its bytes unchanged) in the SCORE_HEADER header.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import numpy as np
import pyarrow as pa
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE

from fraudstream.consumer import held
from fraudstream.consumer import model as scoring
from fraudstream.consumer.decide import (
    STATELESS_LEGIT_HEADERS,
    ColumnarDecider,
    DecidedBatch,
    Decider,
    Decision,
    ReleasedRows,
    Route,
    dead_letter,
)
from fraudstream.consumer.features import (
    CARD_FEATURES,
    PROFILE_DTYPE,
    PROFILE_LAYOUT,
    PROFILE_TTL_MS,
    TxColumns,
    card_features_split,
)
from fraudstream.consumer.rules import COMPROMISED_TERMINAL, RuleSet
from fraudstream.consumer.rules_topic import RULE_SET_HEADER
from fraudstream.consumer.state.stores import StoreSpec, expiry_stream_time
from fraudstream.consumer.state.table import KeyedTable
from fraudstream.errors import RegistryError
from fraudstream.records import ShadowDifference
from fraudstream.evaluate import SCORE_HEADER
from fraudstream.serde import DecodeError
from fraudstream.settings import Settings

log = logging.getLogger("fraudstream.detector")

CARDS = StoreSpec(
    name="cards", dtype=PROFILE_DTYPE, layout=PROFILE_LAYOUT, expiry_field="last_ms", ttl_ms=PROFILE_TTL_MS
)
STORES = (CARDS, held.HELD)
MODEL_RULE = "model"  # the rule name of a record routed to fraud by the model's score
RULE_SETS_KEPT = 16  # rule sets remembered for releasing the records held under them
HELD_DECISION = Decision(Route.HELD, None, None)  # a record held for the terminal rule's look-ahead: no output yet
# On a routed record the shadow rule set decided otherwise: its verdict, b"fraud" or b"legit" (the details are in
# the shadow topic's ShadowDifference).
SHADOW_HEADER = "fraudstream.shadow_verdict"
SHADOW_VERDICT = {True: b"fraud", False: b"legit"}
LABEL_EXPIRY_EVERY = 500  # batches between two expiries of the label table


@dataclass
class DecodedBatch:
    """A batch after decoding and validation, before any rule: what the stateful stage needs."""

    dead: dict[int, Decision] = field(default_factory=dict)  # message index -> its dead letter
    columns: pa.RecordBatch | None = None  # valid current-schema records, decoded together
    column_rows: list[int] = field(default_factory=list)  # message index of each row of `columns`
    records: list[tuple[int, dict]] = field(default_factory=list)  # (message index, record) of the other valid ones


def decode_batch(columnar: ColumnarDecider | None, record_wise: Decider, messages: Sequence) -> DecodedBatch:
    """The decoders' decode steps alone: current-schema records into Arrow where the columnar decoder is
    on, every other record (other writer versions, records it refused) record by record."""
    decoded = DecodedBatch()
    others: Sequence[int]
    if columnar is not None:
        columns = columnar.decode(messages)
        decoded.columns, decoded.column_rows = columns.columns, columns.rows
        decoded.dead = {index: dead_letter(messages[index], error) for index, error in columns.dead.items()}
        others = columns.fallback
    else:
        others = range(len(messages))
    decode = record_wise.decode
    for index in others:
        try:
            _schema_id, record, _transaction = decode(messages[index])
        except DecodeError as error:
            decoded.dead[index] = dead_letter(messages[index], error)
        else:
            decoded.records.append((index, record))
    return decoded


@dataclass(slots=True)
class PreparedBatch:
    """A decoded batch in columns, what `ready` and `decide_prepared` read. Its rows are the decodable records in
    batch order, which within a partition is offset order (what the state needs); `tx` is None when the batch
    has none (dead letters only)."""

    messages: Sequence
    decoded: DecodedBatch
    tx: TxColumns | None = None
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # row -> message index
    from_columns: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # row decoded in Arrow
    source_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # its row in columns or records
    partition_of: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # with_offsets only
    created_ms: int | None = None  # the Kafka timestamp of the newest record (with_offsets only)


def prepare_batch(messages: Sequence, decoded: DecodedBatch, *, with_offsets: bool) -> PreparedBatch:
    """The decoded records as one TxColumns in batch order (the same stable sort as TxColumns.concat_in_order);
    `with_offsets`: also each row's offset and the newest Kafka timestamp (the terminal window's)."""
    parts, is_column = [], []
    if decoded.columns is not None and decoded.columns.num_rows:
        parts.append((decoded.column_rows, TxColumns.from_arrow(decoded.columns)))
        is_column.append(np.ones(len(decoded.column_rows), dtype=bool))
    if decoded.records:
        parts.append(([i for i, _ in decoded.records], TxColumns.from_records([r for _, r in decoded.records])))
        is_column.append(np.zeros(len(decoded.records), dtype=bool))
    if not parts:
        return PreparedBatch(messages, decoded)
    positions = np.concatenate([np.asarray(p, dtype=np.int64) for p, _ in parts])
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    rows_in_batch = positions.tolist()  # plain ints: indexing a list with NumPy ints is slow
    partition_of = np.array([messages[i].partition() for i in rows_in_batch], dtype=np.int32)
    batch = PreparedBatch(
        messages,
        decoded,
        TxColumns.concat_in_order(parts),
        positions,
        np.concatenate(is_column)[order],
        np.concatenate([np.arange(len(p)) for p, _ in parts])[order],
        partition_of,
    )
    if with_offsets:
        batch.offsets = np.array([messages[i].offset() for i in rows_in_batch], dtype=np.int64)
        batch.created_ms = newest_created_ms(messages, positions, partition_of)
    return batch


class StateTouchedError(RegistryError):
    """The registry stopped answering after the batch had changed state (the release of held records decodes
    again): retrying the batch as it stands would count its payments twice. The caller rebuilds the state of
    `partitions` from the changelog and reads the batch again, as after an aborted transaction."""

    def __init__(self, cause: RegistryError, partitions: set[int]) -> None:
        super().__init__(str(cause))
        self.partitions = partitions


class PartitionState(Protocol):
    """The state the decider reads and changes: the detector's TaskManager (consumer/tasks.py), or a
    backtest's MemoryState (consumer/backtest.py)."""

    def tables(self, partition: int) -> Mapping[str, KeyedTable]:
        """store name -> the partition's table of it."""
        ...

    def ready_tables(self, store: str) -> Mapping[int, KeyedTable]:
        """partition -> its table of `store`, for every partition whose state is ready."""
        ...


class StatefulDecider:
    def __init__(
        self,
        decode: Callable[[Sequence], DecodedBatch],
        rules: RuleSet,
        state: PartitionState,
        *,
        encode_legit: Callable[[dict], bytes],
        encode_fraud: Callable[[dict], bytes],
        model: scoring.Model | None = None,
        labels=None,
        terminal_features: Callable[[TxColumns, np.ndarray, np.ndarray, int | None], dict[str, np.ndarray]]
        | None = None,
        terminal=None,
        hold_idle_ms: int | None = None,
        input_topic: str = "",
        encode_shadow: Callable[[dict], bytes] | None = None,
    ) -> None:
        self.decode = decode
        self.rules = rules
        self.state = state
        self.encode_legit = encode_legit
        self.encode_fraud = encode_fraud
        self.model = model
        self.labels = labels  # a LabelsReader (its LabelTable and delay), needed by a model
        self._batches = 0
        # Per-terminal features (consumer/terminal.py, TerminalReader.features): (columns, partitions, offsets,
        # the batch's newest Kafka timestamp).
        self.terminal_features = terminal_features
        # The terminal window's reader (consumer/terminal.py), which held records are released through
        # (consumer/held.py); None: nothing is held, and rows held by an earlier run are released as legit.
        self.terminal = terminal
        self.hold_idle_ms = Settings().terminal_hold_idle_ms if hold_idle_ms is None else hold_idle_ms
        self._topic = input_topic  # the held records' topic, as the dead-letter headers name it
        self.too_large_to_hold = 0  # records decided at once because they do not fit a held row
        self._rule_sets: dict[str, RuleSet] = {}  # version -> the rule sets records were held under, latest last
        # Shadow rules (`fraudstream rules shadow set`): a candidate set decided beside `rules` on every batch,
        # never routing anything; where its verdict differs, a ShadowDifference (encode_shadow) goes to the
        # shadow topic with the batch, and SHADOW_HEADER on the routed record. None: no shadow set.
        self.shadow_rules: RuleSet | None = None
        self.encode_shadow = encode_shadow
        self._shadow_sets: dict[str, RuleSet] = {}  # version -> the shadow sets records were held under
        self.shadow_differences = 0  # ShadowDifferences written since start
        # False (a replay, which produces nothing): the same decisions with no output bytes made. A fraud
        # decision carries its rules and score but no FraudAlert; released held records are reported as arrays
        # in `released_rows` instead of `released`.
        self.make_outputs = True
        # The card features: (each partition's card table, each row's table, the rows) -> features, the tables
        # updated. They do not depend on the rule set: a replay deciding several sets shares one computation.
        self.card_features = card_features_split
        if terminal is not None:
            terminal.keep_from = self.oldest_held

    def decide(self, messages: Sequence) -> list[Decision]:
        return self.decide_batch(messages).decisions(messages)

    def decide_batch(self, messages: Sequence) -> DecidedBatch:
        """The detector's step: decode, readiness (`ready`: waits and reads, changes no state), then the pure
        `decide_prepared`. Legit records decoded in Arrow (written with the current schema) are forwarded with
        no Decision of their own; the batch's rule-set version and their score go in their headers."""
        decoded = self.decode(messages)  # raises before any state is touched
        batch = prepare_batch(messages, decoded, with_offsets=self.terminal_features is not None)
        self.ready(batch)
        return self.decide_prepared(batch)

    def ready(self, batch: PreparedBatch | None) -> None:
        """Readiness, before deciding `batch` (None: releasing between batches): the terminal window's event-time
        gate, reseeds and quiet partitions' ends (TerminalReader.ready), and the labels due by the batch's latest
        event time (a model's). It waits and reads, may raise (a stop, an outage), and changes no state."""
        tx = batch.tx if batch is not None else None
        if self.terminal is not None:
            oldest_held = self.oldest_held()
            self.terminal.ready(
                None if batch is None or tx is None else (tx, batch.partition_of, batch.offsets, batch.created_ms),
                oldest_held_ms=oldest_held,
                holding=oldest_held is not None or (tx is not None and self.rules.look_ahead_ms > 0),
                idle_ms=self.hold_idle_ms,
            )
        if self.model is not None and tx is not None and len(tx):
            self.labels.catch_up(int(tx.event_time_ms.max()))

    def decide_prepared(self, batch: PreparedBatch) -> DecidedBatch:
        """Pure decide: (the batch, the state's tables, the rules, what `ready` read) -> (the decisions, the
        tables' changes, which the caller commits or rolls back). No wait and no I/O; a backtest calls it over
        a replayed history, a shadow set runs inside it."""
        try:
            return self._decide(batch)
        except RegistryError as exc:  # the release of held records decodes again
            touched = {message.partition() for message in batch.messages}
            touched.update(self.state.ready_tables(held.HELD.name))  # releases change the held rows of any of them
            raise StateTouchedError(exc, touched) from exc

    def _decide(self, batch: PreparedBatch) -> DecidedBatch:
        messages, decoded = batch.messages, batch.decoded
        rules = self.rules  # one rule set for the whole batch, even if a new one is installed meanwhile
        legit_headers = [(RULE_SET_HEADER, rules.version.encode())]  # shared by the batch's legit records
        if self.model is None:
            legit_headers += STATELESS_LEGIT_HEADERS  # no model: a legit record is one no rule fired on, score 0
        decisions = DecidedBatch(len(messages), dict(decoded.dead), legit_headers)
        outputs = decisions.outputs
        tx = batch.tx
        if tx is None:
            return decisions
        positions, from_columns, source_row, partition_of = (
            batch.positions,
            batch.from_columns,
            batch.source_row,
            batch.partition_of,
        )

        features = {name: np.empty(len(tx), dtype=dtype) for name, dtype in CARD_FEATURES.items()}
        if self.terminal_features is not None:
            features.update(self.terminal_features(tx, partition_of, batch.offsets, batch.created_ms))
        # Each partition's rows with that partition's card table, all partitions in one pass.
        partitions, which = np.unique(partition_of, return_inverse=True)
        tables = [self.state.tables(int(partition))[CARDS.name] for partition in partitions.tolist()]
        features.update(self.card_features(tables, which, tx))

        fired = rules.evaluate(tx, features)  # (rules, rows)
        is_fraud = np.asarray(fired.any(axis=0))  # fired is (rules, rows): one flag per row, an array
        shadow = self.shadow_rules if self.encode_shadow is not None else None
        shadow_fired = shadow.evaluate(tx, features) if shadow is not None else None  # on the same features
        by_model = None
        if self.model is not None:
            scores = self.model.score(self._model_input(tx, features))
            by_model = scores >= self.model.threshold
            is_fraud = is_fraud | by_model
            legit_scores = [b""] * len(messages)  # only the legit records' entries are read
            for index, value in zip(
                positions[~is_fraud].tolist(), scoring.score_header_values(scores[~is_fraud]), strict=True
            ):
                legit_scores[index] = value
            decisions.legit_scores = legit_scores
        else:
            scores = scoring.rules_score(fired)
        # Legit rows decoded in Arrow are forwarded as they came; the others (other writer versions) are
        # re-encoded. Plain lists and locals: this loop runs once per such record.
        legit, records = Route.LEGIT, dict(decoded.records)
        encode_legit, headers_of = self.encode_legit, decisions.headers_of
        to_hold = (
            rules.to_hold(tx, features, is_fraud)
            if self.terminal is not None and "terminal_cards" in features
            else np.zeros(len(tx), dtype=bool)
        )
        for index in positions[~is_fraud & ~from_columns & ~to_hold].tolist():
            outputs[index] = Decision(legit, messages[index].key(), encode_legit(records[index]), headers_of(index))
        if to_hold.any():
            self._hold(
                rules,
                messages,
                positions,
                partition_of,
                np.flatnonzero(to_hold),
                tx,
                features,
                scores,
                from_columns,
                records,
                decisions,
                shadow_fired,
            )
        fraud_rows = np.flatnonzero(is_fraud)
        if len(fraud_rows):
            make_outputs = self.make_outputs
            if make_outputs:
                column_records = _column_records(decoded, source_row[fraud_rows][from_columns[fraud_rows]])
            for row, names in zip(fraud_rows.tolist(), fired_names(rules.names, fired, fraud_rows), strict=True):
                index = int(positions[row])
                rule_names = list(names)
                if by_model is not None and by_model[row]:
                    rule_names.append(MODEL_RULE)
                if not make_outputs:
                    outputs[index] = Decision(
                        Route.FRAUD, None, None, rules=tuple(rule_names), score=float(scores[row])
                    )
                    continue
                record = column_records[int(source_row[row])] if from_columns[row] else records[index]
                outputs[index] = self._alert(messages[index].key(), record, rule_names, rules, float(scores[row]))
        if shadow is not None and shadow_fired is not None:
            self._shadow(
                rules, shadow, messages, positions, partition_of, tx, fired, shadow_fired, by_model, scores, decisions
            )
        if self.terminal is not None or self._any_held():
            self._release(rules, decisions)
        return decisions

    def _alert(
        self,
        key: bytes | None,
        record: dict,
        rule_names: list[str],
        rules: RuleSet,
        score: float,
        *,
        version: str | None = None,
    ) -> Decision:
        versions = getattr(rules, "versions", {})
        if self.model is not None:
            versions = {**versions, MODEL_RULE: int(self.model.meta.get("model_version", 0))}
        alert = {
            "transaction": record,
            "rules": rule_names,
            "detected_at": int(time.time() * 1000),
            "fired": [{"id": name, "version": versions.get(name, 0)} for name in rule_names],
            "rule_set_version": version or rules.version,
            "score": score,
        }
        return Decision(Route.FRAUD, key, self.encode_fraud(alert), rules=tuple(rule_names), score=score)

    # ----- shadow rules -----
    def _shadow(
        self,
        rules: RuleSet,
        shadow: RuleSet,
        messages: Sequence,
        positions: np.ndarray,
        partition_of: np.ndarray,
        tx: TxColumns,
        fired: np.ndarray,
        shadow_fired: np.ndarray,
        by_model: np.ndarray | None,
        scores: np.ndarray,
        decisions: DecidedBatch,
    ) -> None:
        """The shadow set's verdict beside the live one for each record decided now (a held record is compared
        at its release): where they differ, SHADOW_HEADER on the routed record and a ShadowDifference. The model,
        when there is one, is part of both verdicts."""
        live_fraud, shadow_fraud = np.asarray(fired.any(axis=0)), np.asarray(shadow_fired.any(axis=0))  # per row
        if by_model is not None:
            live_fraud, shadow_fraud = live_fraud | by_model, shadow_fraud | by_model
        outputs = decisions.outputs
        for row in np.flatnonzero(live_fraud != shadow_fraud).tolist():
            index = int(positions[row])
            decision = outputs.get(index)
            if decision is HELD_DECISION:
                continue
            model = [MODEL_RULE] if by_model is not None and by_model[row] else []
            message = messages[index]
            outputs[index] = self._with_shadow_header(
                decision or Decision(Route.LEGIT, message.key(), message.value(), decisions.headers_of(index)),
                bool(shadow_fraud[row]),
            )
            decisions.shadow.append(
                self._difference(
                    str(tx.transaction_id[row]),
                    int(partition_of[row]),
                    message.offset(),
                    int(tx.event_time_ms[row]),
                    (rules, bool(live_fraud[row]), [rules.names[k] for k in np.flatnonzero(fired[:, row])] + model),
                    (
                        shadow,
                        bool(shadow_fraud[row]),
                        [shadow.names[k] for k in np.flatnonzero(shadow_fired[:, row])] + model,
                    ),
                    float(scores[row]),
                )
            )

    @staticmethod
    def _with_shadow_header(decision: Decision, shadow_fraud: bool) -> Decision:
        return dataclasses.replace(
            decision, headers=[*(decision.headers or ()), (SHADOW_HEADER, SHADOW_VERDICT[shadow_fraud])]
        )

    def _difference(
        self,
        transaction_id: str,
        partition: int,
        offset: int,
        event_time_ms: int,
        live: tuple[RuleSet | str, bool, list[str]],
        shadow: tuple[RuleSet | str, bool, list[str]],
        score: float,
    ) -> tuple[bytes, bytes]:
        """A ShadowDifference (key: the transaction id) from each side's (rule set or its version, verdict, rules)."""
        assert self.encode_shadow is not None
        self.shadow_differences += 1
        (live_set, live_fraud, live_rules), (shadow_set, shadow_fraud, shadow_rules) = live, shadow
        record = ShadowDifference(
            transaction_id=transaction_id,
            source_partition=partition,
            source_offset=offset,
            event_time=_utc(event_time_ms),
            live_fraud=live_fraud,
            live_rules=tuple(live_rules) if live_fraud else (),
            live_rule_set_version=live_set if isinstance(live_set, str) else live_set.version,
            shadow_fraud=shadow_fraud,
            shadow_rules=tuple(shadow_rules) if shadow_fraud else (),
            shadow_rule_set_version=shadow_set if isinstance(shadow_set, str) else shadow_set.version,
            score=score,
            detected_at=datetime.now(UTC),
        )
        return transaction_id.encode(), self.encode_shadow(record.to_dict())

    # ----- held records (consumer/held.py) -----
    def _hold(
        self,
        rules: RuleSet,
        messages: Sequence,
        positions: np.ndarray,
        partition_of: np.ndarray,
        rows: np.ndarray,
        tx: TxColumns,
        features: dict[str, np.ndarray],
        scores: np.ndarray,
        from_columns: np.ndarray,
        records: dict[int, dict],
        decisions: DecidedBatch,
        shadow_fired: np.ndarray | None = None,
    ) -> None:
        """Put the batch's rows `rows` in their partitions' held tables, with no output now, under the version
        of the rule set that decided them so far; a row whose bytes do not fit is forwarded as legit at once
        (counted)."""
        self._rule_sets[rules.version] = rules
        if len(self._rule_sets) > RULE_SETS_KEPT:
            del self._rule_sets[next(iter(self._rule_sets))]
        kept_rows: list[int] = []
        values: list[bytes] = []
        rule_set = rules.version.encode()
        for row in rows.tolist():
            index = int(positions[row])
            message = messages[index]
            value = message.value() if from_columns[row] else self.encode_legit(records[index])
            if held.fits(message.key(), value, rule_set):
                kept_rows.append(row)
                values.append(value)
                decisions.outputs[index] = HELD_DECISION
            else:
                self.too_large_to_hold += 1
                decisions.outputs[index] = Decision(Route.LEGIT, message.key(), value, decisions.headers_of(index))
        if len(kept_rows) < len(rows):
            log.warning(
                "%d records too large for a held row (key over %d or value over %d bytes): decided at once, "
                "without the terminal rule's look-ahead (%d so far)",
                len(rows) - len(kept_rows),
                held.KEY_BYTES,
                held.VALUE_BYTES,
                self.too_large_to_hold,
            )
        if not kept_rows:
            return
        kept = np.asarray(kept_rows, dtype=np.int64)
        # The shadow set's verdict now, kept with the row: the release compares it with the live one.
        shadow, shadow_bits, shadow_set = self.shadow_rules, None, b""
        if shadow is not None and shadow_fired is not None and held.fits(None, b"", shadow.version.encode()):
            shadow_bits = np.zeros(len(tx), dtype=np.uint64)
            shadow_bits[kept] = held.shadow_bits(shadow_fired[:, kept])
            shadow_set = shadow.version.encode()
            self._shadow_sets[shadow.version] = shadow
            if len(self._shadow_sets) > RULE_SETS_KEPT:
                del self._shadow_sets[next(iter(self._shadow_sets))]
        index_of = positions[kept].tolist()
        created = np.array([_created_ms(messages[i]) for i in index_of], dtype=np.int64)
        for partition in np.unique(partition_of[kept]).tolist():
            mine = partition_of[kept] == partition
            chosen = kept[mine]
            keys = [held.position_key(partition, messages[i].offset()) for i in positions[chosen].tolist()]
            held.hold(
                self.state.tables(partition)[held.HELD.name],
                keys,
                event_time_ms=tx.event_time_ms[chosen],
                created_ms=created[mine],
                terminal=tx.terminal_hash[chosen],
                card=tx.card_hash[chosen],
                dist_home_km=features["dist_home_km"][chosen],
                score=scores[chosen],
                channel=tx.channel[chosen],
                record_keys=[messages[i].key() for i in positions[chosen].tolist()],
                values=[v for v, m in zip(values, mine.tolist(), strict=True) if m],
                rule_set=rule_set,
                shadow_fired=None if shadow_bits is None else shadow_bits[chosen],
                shadow_set=shadow_set,
            )
        decisions.held = len(kept)

    def _any_held(self) -> bool:
        return any(len(table) for table in self.state.ready_tables(held.HELD.name).values())

    def oldest_held(self) -> int | None:
        """The event time of the oldest record held on this detector's partitions (the terminal window keeps
        what its release reads)."""
        oldest = [
            int(table.rows["event_time_ms"][table.live()[1]].min())
            for table in self.state.ready_tables(held.HELD.name).values()
            if len(table)
        ]
        return min(oldest) if oldest else None

    def release_due(self) -> DecidedBatch | None:
        """Between batches (the input is quiet): the held records due now, as a batch of no input records."""
        if not self._any_held():
            return None
        self.ready(None)
        decisions = DecidedBatch(0, {}, [])
        try:
            self._release(self.rules, decisions)
        except RegistryError as exc:
            raise StateTouchedError(exc, set(self.state.ready_tables(held.HELD.name))) from exc
        return decisions if decisions.released else None

    def _release(self, rules: RuleSet, decisions: DecidedBatch) -> None:
        """Decide the held records whose look-ahead the terminal window now answers for; their outputs go in
        `decisions.released`, their rows are removed (tombstones in the same transaction)."""
        found = [
            (partition, table, *table.live())
            for partition, table in self.state.ready_tables(held.HELD.name).items()
            if len(table)
        ]
        if not found:
            return
        keys = [key for _, _, ks, _ in found for key in ks]
        rows = np.concatenate([table.gather(slots) for _, table, _, slots in found])
        where = np.concatenate([np.full(len(slots), partition) for partition, _, _, slots in found])
        ahead = rules.look_ahead_ms
        if self.terminal is None:  # held by a run with the terminal rule: nothing to look ahead with now
            due = np.ones(len(rows), dtype=bool)
        else:
            due = self.terminal.releasable(rows["event_time_ms"], rows["created_ms"], ahead, self.hold_idle_ms)
        if not due.any():
            return
        picked = np.flatnonzero(due)
        rows = rows[picked]
        keys = [keys[i] for i in picked.tolist()]
        where = where[picked]
        # Each record is released under the rule set that held it (its output names that version; the other
        # rules decided it under that set); one this process no longer knows (held before a restart) lends the
        # version, and the rule set in force the terminal rule's thresholds.
        held_under = rows["rule_set"].tolist()
        by_version = {version: self._rule_sets.get(version.decode(), rules) for version in set(held_under)}
        fires = np.zeros(len(rows), dtype=bool)
        others = None
        cut_short = [""] * len(rows)
        if self.terminal is not None:
            cut_short = self.terminal.cut_short(rows["event_time_ms"], ahead)
            others = self.terminal.other_cards_held(rows["terminal"], rows["card"], rows["event_time_ms"], ahead)
            for version, rule_set in by_version.items():
                mine = np.array([v == version for v in held_under])
                fires[mine] = rule_set.fires_on_release(rows["channel"][mine], rows["dist_home_km"][mine], others[mine])
        if not self.make_outputs:
            self._released_rows(rows, keys, fires, decisions)
        else:
            self._release_outputs(rows, keys, held_under, by_version, fires, others, cut_short, decisions)
        for partition in np.unique(where).tolist():
            table = self.state.tables(partition)[held.HELD.name]
            table.remove([key for key, p in zip(keys, where.tolist(), strict=True) if p == partition])
            decisions.state_partitions.add(partition)

    def _released_rows(self, rows: np.ndarray, keys: list[bytes], fires: np.ndarray, decisions: DecidedBatch) -> None:
        """The released records' routes and scores as arrays: what their outputs would carry, none made."""
        if self.model is not None:  # the legit header's 6 significant digits; an alert carries the score as is
            score = np.array([float(v) for v in scoring.score_header_values(rows["score"])])
            score[fires] = rows["score"][fires]
        else:
            score = fires.astype(np.float64)  # the stateless rule's score: 1.0 when it fired
        positions = np.frombuffer(b"".join(keys), dtype=">u8").astype(np.uint64)
        decisions.released_rows.append(ReleasedRows(positions, fires.copy(), score))

    def _release_outputs(
        self,
        rows: np.ndarray,
        keys: list[bytes],
        held_under: list[bytes],
        by_version: dict[bytes, RuleSet],
        fires: np.ndarray,
        others: np.ndarray | None,
        cut_short: list[str],
        decisions: DecidedBatch,
    ) -> None:
        """The released records' outputs, each as its input record and Decision in `decisions.released`."""
        inputs = held.records_of(rows, keys, self._topic)
        released = decisions.released
        first_released = len(released)  # this call's records follow
        legit_scores = (
            scoring.score_header_values(rows["score"])
            if self.model is not None
            else [STATELESS_LEGIT_HEADERS[0][1]] * len(rows)
        )
        fraud = np.flatnonzero(fires)
        if len(fraud):
            decoded = self.decode([inputs[i] for i in fraud.tolist()])
            as_records = dict(decoded.records)
            if decoded.columns is not None and decoded.columns.num_rows:
                as_records.update(zip(decoded.column_rows, decoded.columns.to_pylist(), strict=True))
        for i, record_in in enumerate(inputs):
            version = held_under[i]
            if fires[i]:
                k = int(np.searchsorted(fraud, i))
                record = as_records.get(k)
                decision = (
                    self._alert(
                        record_in.key(),
                        record,
                        [COMPROMISED_TERMINAL],
                        by_version[version],
                        float(rows["score"][i]) if self.model is not None else 1.0,
                        version=version.decode(),
                    )
                    if record is not None
                    else decoded.dead[k]
                )
            else:
                decision = Decision(
                    Route.LEGIT,
                    record_in.key(),
                    record_in.value(),
                    [(RULE_SET_HEADER, version), (SCORE_HEADER, legit_scores[i])],
                )
            if cut_short[i]:
                decision = dataclasses.replace(
                    decision, headers=[*(decision.headers or ()), (held.RELEASED_EARLY_HEADER, cut_short[i].encode())]
                )
            released.append((record_in, decision))
        if self.encode_shadow is not None and rows["shadow_set"].any():
            self._shadow_on_release(rows, fires, others, released, first_released, decisions)

    def _shadow_on_release(
        self,
        rows: np.ndarray,
        fires: np.ndarray,
        others: np.ndarray | None,
        released: list,
        first: int,
        decisions: DecidedBatch,
    ) -> None:
        """Released records held while a shadow set ran: its verdict (the rules that fired when it was held, or
        its terminal rule now, with the look-ahead) beside the live one; a difference as in _shadow."""
        at_hold = rows["shadow_fired"] != 0
        on_release = np.zeros(len(rows), dtype=bool)
        by_version: dict[bytes, RuleSet | None] = {}
        for version in set(rows["shadow_set"].tolist()) - {b""}:
            # A set this process no longer knows (held before a restart) lends the version; the shadow set in
            # force, if any, the terminal rule's thresholds.
            by_version[version] = self._shadow_sets.get(version.decode(), self.shadow_rules)
            mine = rows["shadow_set"] == version
            shadow_set = by_version[version]
            if shadow_set is not None and others is not None:
                on_release[mine] = shadow_set.fires_on_release(
                    rows["channel"][mine], rows["dist_home_km"][mine], others[mine]
                )
        shadow_fraud = at_hold | on_release
        compared = rows["shadow_set"] != b""
        differ = np.flatnonzero(compared & (shadow_fraud != fires))
        if not len(differ):
            return
        decoded = self.decode([released[first + i][0] for i in differ.tolist()])
        ids = dict(decoded.records)
        if decoded.columns is not None and decoded.columns.num_rows:
            ids.update(zip(decoded.column_rows, decoded.columns.to_pylist(), strict=True))
        for k, i in enumerate(differ.tolist()):
            record_in, decision = released[first + i]
            if k not in ids or decision.route is Route.DEAD_LETTER:
                continue  # unreadable now: dead-lettered by the live side already
            version = rows["shadow_set"][i]
            shadow_set = by_version[version]
            names = held.fired_names(int(rows["shadow_fired"][i]), shadow_set.names if shadow_set else ())
            names += [COMPROMISED_TERMINAL] if on_release[i] else []
            released[first + i] = (record_in, self._with_shadow_header(decision, bool(shadow_fraud[i])))
            decisions.shadow.append(
                self._difference(
                    str(ids[k]["transaction_id"]),
                    record_in.partition(),
                    record_in.offset(),
                    int(rows["event_time_ms"][i]),
                    (rows["rule_set"][i].decode(), bool(fires[i]), [COMPROMISED_TERMINAL]),
                    (version.decode(), bool(shadow_fraud[i]), names),
                    float(rows["score"][i]) if self.model is not None else float(fires[i]),
                )
            )

    def _model_input(self, tx: TxColumns, features: dict[str, np.ndarray]) -> np.ndarray:
        """The model's features, from the labels `ready` read up to the batch's latest event time."""
        labels = self.labels
        self._batches += 1
        if self._batches % LABEL_EXPIRY_EVERY == 0:
            # No window reaches further back than the longest one before the delay (plus a day for late records).
            labels.table.expire(
                expiry_stream_time(int(tx.event_time_ms.max()))
                - labels.delay_ms
                - (max(scoring.TERMINAL_WINDOWS_DAYS) + 1) * scoring.DAY_MS
            )
        return scoring.model_features(tx, features, labels.table, labels.delay_ms)


def load_scoring(settings: Settings, *, on_log: Callable[[str], None], keep_verdicts: bool = False):
    """The model of `detect --model` and a started reader of the labels topic for it; (None, None) without one.
    `keep_verdicts`: the reader also keeps each transaction's label (LabelsReader.verdicts)."""
    if settings.model_file is None:
        return None, None
    from fraudstream.consumer.labels_topic import LabelsReader

    model = scoring.Model.load(settings.model_file)
    labels = LabelsReader(settings, scoring.LabelTable(), on_log=on_log, keep_verdicts=keep_verdicts)
    labels.start()
    on_log(
        f"model {model.name} from {settings.model_file} (threshold {model.threshold:.3f}, labels "
        f"{settings.label_delay_days:g} days late)"
    )
    return model, labels


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def fired_names(names: Sequence[str], fired: np.ndarray, rows: np.ndarray) -> list[tuple[str, ...]]:
    """For each of `rows`, the names of the rules that fired on it (`fired`: rules x rows, booleans), in rule order:
    one lookup per combination of rules, not a search per row."""
    if len(names) > 63:  # more rules than bits in a code: one search per row
        return [tuple(names[k] for k in np.flatnonzero(fired[:, row]).tolist()) for row in rows.tolist()]
    codes = (np.uint64(1) << np.arange(len(names), dtype=np.uint64)) @ fired[:, rows].astype(np.uint64)
    by_code = {code: tuple(n for k, n in enumerate(names) if code >> k & 1) for code in set(codes.tolist())}
    return [by_code[code] for code in codes.tolist()]


def _utc(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)  # exact to the millisecond (no float seconds)


def _timestamp_ms(message) -> int | None:
    """A message's Kafka timestamp, or None when it carries none."""
    kind, ms = message.timestamp()
    return ms if kind != TIMESTAMP_NOT_AVAILABLE and ms >= 0 else None


def _created_ms(message) -> int:
    """A message's Kafka timestamp; the wall clock when it carries none."""
    ms = _timestamp_ms(message)
    return int(time.time() * 1000) if ms is None else ms


def newest_created_ms(messages: Sequence, positions: np.ndarray, partition_of: np.ndarray) -> int | None:
    """The latest Kafka timestamp among each partition's last record of the batch (a partition's records land in
    the order they were produced); None when the records carry none."""
    _, last = np.unique(partition_of[::-1], return_index=True)
    stamps = [_timestamp_ms(messages[int(positions[len(positions) - 1 - i])]) for i in last]
    known = [ms for ms in stamps if ms is not None]
    return max(known) if known else None


def _column_records(decoded: DecodedBatch, rows: np.ndarray) -> dict[int, dict]:
    """The few Arrow rows that become FraudAlerts, as records (row number -> record)."""
    if not len(rows):
        return {}
    if decoded.columns is None:
        raise ValueError(f"{len(rows)} Arrow rows asked of a batch that has no Arrow columns")
    taken = decoded.columns.take(pa.array(rows, type=pa.int64())).to_pylist()
    return {int(row): record for row, record in zip(rows, taken, strict=True)}
