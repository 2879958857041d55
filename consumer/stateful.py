"""The stateful decide stage: decode a batch, compute each card's features from its state, run the rules,
encode the outputs.

The batch is decoded first, completely (a registry outage raises before any state changes, so a retried
batch is never counted twice). Valid records, whichever decoder path read them, become one set of
columns in offset order; each input partition's rows then go through the card features with that
partition's tables; the rules run on the whole batch's columns. Legit records written with the current
schema are forwarded byte for byte, others re-encoded; fraud records become FraudAlerts naming the rules
that fired.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from fraudstream.consumer.decide import ColumnarDecider, DecidedBatch, Decider, Decision, Route, dead_letter
from fraudstream.consumer.features import CARD_FEATURES, PROFILE_DTYPE, PROFILE_LAYOUT, PROFILE_TTL_MS, TxColumns, card_features
from fraudstream.consumer.rules import RuleSet
from fraudstream.consumer.rules_topic import RULE_SET_HEADER
from fraudstream.consumer.state.manager import StateManager
from fraudstream.consumer.state.stores import StoreSpec
from fraudstream.serde import DecodeError

CARDS = StoreSpec(name="cards", dtype=PROFILE_DTYPE, layout=PROFILE_LAYOUT, expiry_field="last_ms",
                  ttl_ms=PROFILE_TTL_MS)
STORES = (CARDS,)


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


class StatefulDecider:
    def __init__(self, decode: Callable[[Sequence], DecodedBatch], rules: RuleSet, state: StateManager, *,
                 encode_legit: Callable[[dict], bytes], encode_fraud: Callable[[dict], bytes]) -> None:
        self.decode = decode
        self.rules = rules
        self.state = state
        self.encode_legit = encode_legit
        self.encode_fraud = encode_fraud

    def decide(self, messages: Sequence) -> list[Decision]:
        return self.decide_batch(messages).decisions(messages)

    def decide_batch(self, messages: Sequence) -> DecidedBatch:
        """Legit records decoded in Arrow (written with the current schema) are forwarded with no Decision
        of their own; the batch's rule-set version goes in their headers."""
        decoded = self.decode(messages)  # raises before any state is touched
        rules = self.rules  # one rule set for the whole batch, even if a new one is installed meanwhile
        legit_headers = [(RULE_SET_HEADER, rules.version.encode())]  # shared by the batch's legit records
        decisions = DecidedBatch(len(messages), dict(decoded.dead), legit_headers)
        outputs = decisions.outputs
        parts, is_column = [], []
        if decoded.columns is not None and decoded.columns.num_rows:
            parts.append((decoded.column_rows, TxColumns.from_arrow(decoded.columns)))
            is_column.append(np.ones(len(decoded.column_rows), dtype=bool))
        if decoded.records:
            parts.append(([i for i, _ in decoded.records], TxColumns.from_records([r for _, r in decoded.records])))
            is_column.append(np.zeros(len(decoded.records), dtype=bool))
        if not parts:
            return decisions
        # Rows back in batch order, which within a partition is offset order (what the state needs);
        # the same stable sort as TxColumns.concat_in_order.
        positions = np.concatenate([np.asarray(p, dtype=np.int64) for p, _ in parts])
        order = np.argsort(positions, kind="stable")
        positions = positions[order]
        from_columns = np.concatenate(is_column)[order]
        source_row = np.concatenate([np.arange(len(p)) for p, _ in parts])[order]
        tx = TxColumns.concat_in_order(parts)

        features = {name: np.empty(len(tx), dtype=dtype) for name, dtype in CARD_FEATURES.items()}
        partition_of = np.fromiter((messages[i].partition() for i in positions), np.int32, len(positions))
        for partition in np.unique(partition_of):
            rows = np.flatnonzero(partition_of == partition)
            table = self.state.tables(int(partition))[CARDS.name]
            for name, values in card_features(table, tx.take(rows)).items():
                features[name][rows] = values

        fired = rules.evaluate(tx, features)  # (rules, rows)
        is_fraud = fired.any(axis=0)
        # Legit rows decoded in Arrow are forwarded as they came; the others (other writer versions) are
        # re-encoded. Plain lists and locals: this loop runs once per such record.
        legit, records = Route.LEGIT, dict(decoded.records)
        encode_legit = self.encode_legit
        fraud_rows = np.flatnonzero(is_fraud)
        for index in positions[~is_fraud & ~from_columns].tolist():
            outputs[index] = Decision(legit, messages[index].key(), encode_legit(records[index]), legit_headers)
        if len(fraud_rows):
            names, versions, now_ms = rules.names, getattr(rules, "versions", {}), int(time.time() * 1000)
            column_records = _column_records(decoded, source_row[fraud_rows][from_columns[fraud_rows]])
            for row in fraud_rows.tolist():
                index = int(positions[row])
                record = column_records[int(source_row[row])] if from_columns[row] else records[index]
                rule_names = [names[k] for k in np.flatnonzero(fired[:, row])]
                alert = {"transaction": record, "rules": rule_names, "detected_at": now_ms,
                         "fired": [{"id": name, "version": versions.get(name, 0)} for name in rule_names],
                         "rule_set_version": rules.version}
                outputs[index] = Decision(Route.FRAUD, messages[index].key(), self.encode_fraud(alert),
                                          rules=tuple(rule_names))
        return decisions


def _column_records(decoded: DecodedBatch, rows: np.ndarray) -> dict[int, dict]:
    """The few Arrow rows that become FraudAlerts, as records (row number -> record)."""
    if not len(rows):
        return {}
    taken = decoded.columns.take(pa.array(rows, type=pa.int64())).to_pylist()
    return {int(row): record for row, record in zip(rows, taken, strict=True)}
