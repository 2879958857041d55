"""The analyst console under load: the queue page with 200,000 alerts indexed, and the live update's delay.

    python -m benchmarks.console [--alerts 200000] [--requests 200] [--live 100]

1. queue: fills the console's SQLite index (its own add_alerts, as the reader does) with N alerts over a
   week (scores spread over the bands, five rules, 20,000 cards, a tenth with a verdict), then times whole
   page requests through the app (Starlette's test client: routing, the index's queries, the template) for
   the queries an analyst makes: the first page, a deep page, and filters by rule, card, amount and time.
2. live: a console on a fresh set of topics of the running broker, an SSE client reading /events, and alerts
   written to the fraud topic one at a time; the delay is from the write (acknowledged by the broker) to
   the event arriving at the client. Needs the local stack (or KAFKA_BOOTSTRAP_SERVERS and
   SCHEMA_REGISTRY_URL). The detector's own transaction commit (its batch time) comes on top.

Writes benchmarks/results/console.json and console.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
RULES = ("large_amount", "card_testing", "velocity", "impossible_travel", "compromised_terminal")
T0 = 1_780_000_000_000
WEEK_MS = 7 * 86_400_000


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def synthetic_alert(i: int, rng: random.Random) -> dict:
    at = T0 + int(i / 200_000 * WEEK_MS)
    fired = rng.sample(RULES, rng.choice((1, 1, 1, 2)))
    return {
        "transaction": {
            "transaction_id": f"tx-{i:07d}",
            "account_id": f"acc-{i % 20_000}",
            "card_id": f"card-{i % 20_000}",
            "merchant_id": f"m-{rng.randrange(2_000)}",
            "merchant_category": "5411",
            "terminal_id": f"t-{rng.randrange(5_000)}",
            "amount_cents": rng.randrange(100, 500_000),
            "currency": "USD",
            "event_time": at - 500,
            "channel": "ONLINE",
            "country": "US",
            "city": "Springfield",
            "latitude": 39.8,
            "longitude": -89.6,
            "device_id": None,
        },
        "rules": fired,
        "detected_at": at,
        "fired": [{"id": r, "version": 1} for r in fired],
        "rule_set_version": "6",
        "score": round(rng.random(), 4),
    }


def bench_queue(alerts: int, requests: int) -> dict:
    from starlette.testclient import TestClient

    from fraudstream.console.app import ConsoleState, create_app
    from fraudstream.console.auth import Authenticator
    from fraudstream.console.index import Index
    from fraudstream.settings import Settings

    rng = random.Random(7)
    index = Index(Path(tempfile.mkdtemp(prefix="bench-console-")) / "index.sqlite")
    started = time.perf_counter()
    for start in range(0, alerts, 10_000):
        index.add_alerts([(0, i, synthetic_alert(i, rng)) for i in range(start, min(start + 10_000, alerts))])
    verdicts = [
        (
            0,
            i,
            {
                "transaction_id": f"tx-{i:07d}",
                "is_fraud": i % 3 == 0,
                "scenario": "legit",
                "source": "analyst",
                "labelled_by": "bench",
                "labelled_at": T0,
                "event_time": T0,
            },
        )
        for i in range(0, alerts, 10)
    ]
    index.add_labels(verdicts)
    fill_s = time.perf_counter() - started
    state = ConsoleState(
        settings=Settings(),
        index=index,
        authenticator=Authenticator(None, anonymous_name="bench"),
        writer=None,
    )
    client = TestClient(create_app(state), client=("127.0.0.1", 1))
    since = time.strftime("%Y-%m-%dT%H:%M", time.gmtime((T0 + 3 * 86_400_000) / 1000))
    queries = {
        "first page": "/",
        "page 100": "/?page=100",
        "rule filter": "/?rule=velocity",
        "card filter": "/?card=card-123",
        "amount range": "/?min_amount=1000&max_amount=1200",
        "since 3 days in": f"/?since={since}",
    }
    results = {}
    for name, url in queries.items():
        assert client.get(url).status_code == 200  # warm
        times = []
        for _ in range(requests):
            t = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - t) * 1000)
            assert response.status_code == 200
        results[name] = {"p50_ms": percentile(times, 0.5), "p95_ms": percentile(times, 0.95), "max_ms": max(times)}
        print(f"queue {name:16} p50 {results[name]['p50_ms']:6.1f} ms   p95 {results[name]['p95_ms']:6.1f} ms")
    return {"alerts": alerts, "verdicts": len(verdicts), "fill_s": fill_s, "requests_each": requests, "pages": results}


def bench_live(count: int) -> dict:
    import httpx
    from confluent_kafka import Producer

    from fraudstream.console import start_in_thread
    from fraudstream.kafka import ensure_topics, producer_config
    from fraudstream.registry import Registry, current_ids, register_all
    from fraudstream.schemas import load_schemas
    from fraudstream.serde import make_encoder
    from fraudstream.settings import Settings

    settings = Settings.from_env().replace(transactions_topic=f"bench-console-{uuid.uuid4().hex[:8]}")
    ensure_topics(settings)
    register_all(settings)
    encode = make_encoder(
        current_ids(settings, Registry(settings))[settings.fraud_topic],
        load_schemas(settings.schemas_dir).parsed["FraudAlert"],
    )
    console = start_in_thread(settings, port=0, index_file=Path(tempfile.mkdtemp()) / "index.sqlite")
    received: dict[str, float] = {}
    opened = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", console.url + "/events", timeout=None) as stream:
            for line in stream.iter_lines():
                opened.set()
                if line.startswith("data: "):
                    received[json.loads(line[6:])["transaction_id"]] = time.perf_counter()
                if len(received) >= count:
                    return

    threading.Thread(target=listen, daemon=True).start()
    opened.wait(30)
    deadline = time.monotonic() + 60
    while not console.state.reader.state.caught_up and time.monotonic() < deadline:
        time.sleep(0.05)
    producer = Producer(producer_config(settings))
    rng = random.Random(3)
    sent: dict[str, float] = {}
    for i in range(count):
        alert = synthetic_alert(i, rng)
        tid = alert["transaction"]["transaction_id"] = f"live-{i}"
        alert["detected_at"] = int(time.time() * 1000)
        producer.produce(settings.fraud_topic, encode(alert), tid.encode())
        producer.flush(10)
        sent[tid] = time.perf_counter()
        time.sleep(0.05)  # one alert at a time, as a quiet detector routes them
    deadline = time.monotonic() + 30
    while len(received) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    console.stop()
    delays = [(received[t] - sent[t]) * 1000 for t in sent if t in received]
    result = {
        "alerts": count,
        "received": len(delays),
        "p50_ms": percentile(delays, 0.5),
        "p95_ms": percentile(delays, 0.95),
        "max_ms": max(delays),
        "mean_ms": statistics.fmean(delays),
    }
    print(
        f"live update: {len(delays)}/{count} received, p50 {result['p50_ms']:.0f} ms, p95 {result['p95_ms']:.0f} ms, "
        f"max {result['max_ms']:.0f} ms"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alerts", type=int, default=200_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--live", type=int, default=100, help="alerts for the live-update delay (0: skip)")
    args = parser.parse_args()
    report = {"queue": bench_queue(args.alerts, args.requests)}
    if args.live:
        report["live"] = bench_live(args.live)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "console.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Console: queue page with {report['queue']['alerts']:,} alerts indexed",
        "",
        f"Index filled in {report['queue']['fill_s']:.1f} s ({report['queue']['verdicts']:,} with a verdict). "
        f"Whole page requests through the app, {args.requests} each:",
        "",
        "| page | p50 ms | p95 ms | max ms |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['max_ms']:.1f} |"
        for name, r in report["queue"]["pages"].items()
    ]
    if "live" in report:
        live = report["live"]
        lines += [
            "",
            f"Live update (fraud topic write acknowledged -> SSE event at the client), {live['received']} "
            f"of {live['alerts']} alerts: p50 {live['p50_ms']:.0f} ms, p95 {live['p95_ms']:.0f} ms, "
            f"max {live['max_ms']:.0f} ms.",
        ]
    (RESULTS / "console.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
