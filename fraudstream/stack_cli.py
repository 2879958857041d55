"""`fraudstream stack up | down | status`."""

from __future__ import annotations

import argparse

from fraudstream.argtypes import positive_int
from fraudstream.settings import ENV, Settings
from fraudstream.stack import LocalStack


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--wipe", action="store_true", help="with down: also delete Kafka's and the registry's data")
    parser.add_argument(
        "--secure",
        action="store_true",
        help="with up: TLS, authentication and ACLs everywhere (no PLAINTEXT listener): SASL_SSL with a "
        "SCRAM user per role (see `fraudstream acl`), a mutual-TLS listener, the registry behind "
        "HTTPS only, with HTTP Basic users and roles; a CA, certificates and passwords made at first start; "
        "prints the client properties files to use [ports: FRAUDSTREAM_KAFKA_SECURE_PORT, "
        "FRAUDSTREAM_KAFKA_MTLS_PORT, FRAUDSTREAM_REGISTRY_SECURE_PORT]. Use its own "
        "FRAUDSTREAM_STACK_DIR: the plain stack's data cannot be secured",
    )
    parser.add_argument(
        "--unsecured-jwt",
        action="store_true",
        help="with up --secure: also an OAUTHBEARER listener that accepts unsigned JWTs (any client "
        "can name itself anyone; tests only) [port: FRAUDSTREAM_KAFKA_JWT_PORT]",
    )
    parser.add_argument(
        "--brokers",
        type=positive_int,
        default=None,
        help="with up: Kafka nodes (default 1; 3 is a production-like cluster: replication factor 3, "
        "min.insync.replicas 2). Node n listens on the Kafka and controller ports + 2(n-1)",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    stack = LocalStack(settings, brokers=args.brokers if args.action == "up" else None)
    if args.action == "up":
        status = stack.up(secure=args.secure, unsecured_jwt=args.unsecured_jwt)
        print(status.describe())
        if status.secure:  # the plain addresses are closed or admin-only: name the role files instead
            print(f"\n# e.g. as the producer (these files name the secured endpoints):\n{status.secure.exports()}")
        else:
            print(
                f"\nexport KAFKA_BOOTSTRAP_SERVERS={status.bootstrap_servers}\n"
                f"export SCHEMA_REGISTRY_URL={status.registry_url}"
            )
        if stack.brokers > 1:  # so that our tools create their topics with as many replicas as the cluster keeps
            print(f"export {ENV['replication_factor']}={stack.replication_factor}")
        return 0
    if args.action == "down":
        stack.down(wipe=args.wipe)
        return 0
    status = stack.status()
    print(status.describe())
    return 0 if status.running else 3
