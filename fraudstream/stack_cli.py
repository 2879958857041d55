"""`fraudstream stack up | down | status`."""

from __future__ import annotations

import argparse

from fraudstream.argtypes import positive_int
from fraudstream.settings import ENV, Settings
from fraudstream.stack import LocalStack


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--wipe", action="store_true", help="with down: also delete Kafka's and the registry's data")
    parser.add_argument("--secure", action="store_true",
                        help="with up: also a SASL_SSL listener (SCRAM-SHA-512, OAUTHBEARER with unsecured JWTs), a "
                             "mutual-TLS listener and an HTTPS registry port, with a CA and certificates made at first "
                             "start; prints the client properties files to use [ports: FRAUDSTREAM_KAFKA_SECURE_PORT, "
                             "FRAUDSTREAM_KAFKA_MTLS_PORT, FRAUDSTREAM_REGISTRY_SECURE_PORT]")
    parser.add_argument("--brokers", type=positive_int, default=None,
                        help="with up: Kafka nodes (default 1; 3 is a production-like cluster: replication factor 3, "
                             "min.insync.replicas 2). Node n listens on the Kafka and controller ports + 2(n-1)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    stack = LocalStack(settings, brokers=args.brokers if args.action == "up" else None)
    if args.action == "up":
        status = stack.up(secure=args.secure)
        print(status.describe())
        print(f"\nexport KAFKA_BOOTSTRAP_SERVERS={status.bootstrap_servers}\nexport SCHEMA_REGISTRY_URL={status.registry_url}")
        if status.secure:
            print(f"# or, for the secured endpoints (these files name them):\n{status.secure.exports()}")
        if stack.brokers > 1:  # so that our tools create their topics with as many replicas as the cluster keeps
            print(f"export {ENV['replication_factor']}={stack.replication_factor}")
        return 0
    if args.action == "down":
        stack.down(wipe=args.wipe)
        return 0
    status = stack.status()
    print(status.describe())
    return 0 if status.running else 3
