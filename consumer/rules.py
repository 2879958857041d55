"""Fraud rules: pure functions over typed transactions, all in this module.

A rule is a name and a predicate over a Transaction, plus the same predicate over a batch's
Arrow columns for the columnar decoder (tests/unit/test_rules.py checks that the two agree).
A transaction is fraud when at least one rule fires, and its FraudAlert names them. Rules see
one transaction at a time and keep no state, so they give the same answer in any detector
process of the group, before or after a crash.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from fraudstream.records import Transaction
from fraudstream.settings import Settings


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    fires: Callable[[Transaction], bool]
    fires_on_columns: Callable[[pa.RecordBatch], pa.BooleanArray]


def large_amount(threshold_cents: int) -> Rule:
    """The seed's rule: more than the threshold (default $900.00) in one transaction."""
    return Rule("large_amount", lambda tx: tx.amount_cents > threshold_cents,
                lambda batch: pc.greater(batch.column("amount_cents"), threshold_cents))


def rules_from_settings(settings: Settings) -> tuple[Rule, ...]:
    return (large_amount(settings.fraud_threshold_cents),)


def fired(rules: Sequence[Rule], transaction: Transaction) -> list[str]:
    """Names of the rules that fire for this transaction (empty: legit)."""
    return [rule.name for rule in rules if rule.fires(transaction)]
