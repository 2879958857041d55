"""Micro-benchmark of the decide stage alone (no broker): records/s of decide() on batches of 2,000
generated transactions, per decider, on a clean batch and on a batch with one corrupt record.

    python -m benchmarks.decide                          # the deciders of this checkout
    python -m benchmarks.decide --baseline old_decide.py # side by side with another consumer/decide.py,
                                                         # e.g. `git show main:consumer/decide.py > old_decide.py`

A few seconds; CPU time of one process, so a busy machine moves all figures alike. Ratios are
against the columnar decider of this checkout on the clean batch.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import fraudstream.consumer.decide
from fraudstream.consumer.rules import rules_from_settings
from fraudstream.schemas import load_schemas
from fraudstream.serde import Decoder, make_encoder
from fraudstream.settings import Settings

TRANSACTION_ID, FRAUD_ID = 1, 2


class Message:
    __slots__ = ("_value", "_key", "_offset")

    def __init__(self, value: bytes, offset: int) -> None:
        self._value, self._key, self._offset = value, b"acc", offset

    def value(self):
        return self._value

    def key(self):
        return self._key

    def topic(self):
        return "transactions"

    def partition(self):
        return 0

    def offset(self):
        return self._offset

    def headers(self):
        return None


class Registry:
    def __init__(self, schema: dict) -> None:
        self.schema = schema

    def schema_by_id(self, schema_id: int) -> dict:
        return self.schema


def deciders(module: ModuleType, settings: Settings) -> dict[str, Callable[[list], list]]:
    """The two deciders a module offers, built as the detector builds them (columnar: trailing bytes allowed)."""
    schemas = load_schemas(settings.schemas_dir)

    def record_wise(strict: bool):
        decoder = Decoder(Registry(schemas.expanded["Transaction"]), schemas.expanded["Transaction"])
        return module.Decider(
            decoder,
            rules_from_settings(settings),
            legit_schema_id=TRANSACTION_ID,
            legit_schema=schemas.parsed["Transaction"],
            fraud_schema_id=FRAUD_ID,
            fraud_schema=schemas.parsed["FraudAlert"],
            reject_trailing_bytes=strict,
        )

    columnar = module.ColumnarDecider(record_wise(False), reader_schema=schemas.expanded["Transaction"])
    record = record_wise(True)
    # What the detector calls: decide_batch (no object per forwarded record) where the module has it.
    return {
        "record": getattr(record, "decide_batch", record.decide),
        "columnar": getattr(columnar, "decide_batch", columnar.decide),
    }


def batches(settings: Settings, size: int) -> dict[str, list[Message]]:
    from fraudstream.producer.generator import Generator

    schemas = load_schemas(settings.schemas_dir)
    encode = make_encoder(TRANSACTION_ID, schemas.parsed["Transaction"])
    values = [encode(tx.to_dict()) for tx, _ in Generator(7).next_batch(size, 1_700_000_000_000)]
    corrupt = list(values)
    corrupt[size // 3] = corrupt[size // 3][:25]  # cut inside a string: pyruhvro refuses the whole batch
    return {
        "clean": [Message(v, i) for i, v in enumerate(values)],
        "one corrupt": [Message(v, i) for i, v in enumerate(corrupt)],
    }


def measure(contenders: dict[tuple, tuple[Callable[[list], list], list]], seconds: float) -> dict[tuple, float]:
    """Median records/s of each contender's decide(), timed in interleaved rounds (one call each per
    round) for about `seconds` per contender, so that a change in the machine's load hits all alike."""
    for decide, messages in contenders.values():
        decide(messages)  # warm caches (schema by id, pyruhvro's parsed schema)
    rates = {key: [] for key in contenders}
    deadline = time.perf_counter() + seconds * len(contenders)
    while time.perf_counter() < deadline or min(len(r) for r in rates.values()) < 5:
        for key, (decide, messages) in contenders.items():
            started = time.process_time()
            decide(messages)
            rates[key].append(len(messages) / max(time.process_time() - started, 1e-9))
    return {key: statistics.median(r) for key, r in rates.items()}


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_decide", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decide", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2_000, help="records per batch (the detector's default)")
    parser.add_argument("--seconds", type=float, default=1.5, help="measuring time per figure")
    parser.add_argument("--baseline", type=Path, help="another consumer/decide.py to measure side by side")
    args = parser.parse_args()
    settings = Settings()
    contenders = {"this": deciders(fraudstream.consumer.decide, settings)}
    if args.baseline:
        contenders["baseline"] = deciders(load_module(args.baseline), settings)
    results = measure(
        {
            (who, name, batch): (decide, messages)
            for batch, messages in batches(settings, args.batch).items()
            for who, by_name in contenders.items()
            for name, decide in by_name.items()
        },
        args.seconds,
    )
    reference = results[("this", "columnar", "clean")]
    print(f"decide() on batches of {args.batch:,}; CPU time of one process, median of interleaved rounds")
    print("| decide.py | decider | batch | records/s | ÷ this columnar, clean |")
    print("|---|---|---|---:|---:|")
    for (who, name, batch), rate in results.items():
        print(f"| {who} | {name} | {batch} | {rate:,.0f} | {rate / reference:.2f}× |")


if __name__ == "__main__":
    main()
