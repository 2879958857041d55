"""`fraudstream console`: the analysts' web application (review queue, alerts, verdicts, rules, dashboard).

    fraudstream console [--host 127.0.0.1] [--port 8088] [--users FILE] [connection flags]
    fraudstream console --hash-password < password.txt     a users file's password hash (read from stdin)

It reads the topics with the same client configuration as every other command (-F, -X, --registry-config,
-R), rebuilds its index from them at start (the log is the source of truth), and serves the pages.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fraudstream import argtypes
from fraudstream.errors import ConfigError
from fraudstream.settings import Settings

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8088

log = logging.getLogger("fraudstream.console")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fraudstream.cli import add_connection_arguments

    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}; any other needs --users)"
    )
    parser.add_argument("--port", type=argtypes.count, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--users",
        type=Path,
        metavar="FILE",
        help="users file (TOML: [users.NAME] password = scrypt hash, roles = [analyst, rules_admin])",
    )
    parser.add_argument(
        "--index",
        type=Path,
        metavar="FILE",
        help="the SQLite index file, rebuilt at every start (default: a new temporary file)",
    )
    parser.add_argument(
        "--group-id",
        dest="group_id",
        help="the detectors' consumer group, for lag and throughput [FRAUDSTREAM_GROUP_ID]",
    )
    parser.add_argument(
        "--hash-password",
        action="store_true",
        help="read a password on stdin, print its hash for a users file, and exit",
    )
    add_connection_arguments(parser)


@dataclass
class RunningConsole:
    """A console started in this process (the demo, the tests): its state, its server, its URL."""

    state: Any
    server: Any
    thread: Any
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.state.reader.stop()
        self.state.writer.close()


def build_state(
    settings: Settings,
    *,
    users_file: Path | None = None,
    host: str = DEFAULT_HOST,
    index_file: Path | None = None,
    start_reader: bool = True,
):
    from fraudstream.console.app import ConsoleState
    from fraudstream.console.auth import Authenticator, Users, is_loopback
    from fraudstream.console.index import Index
    from fraudstream.console.reader import TopicReader
    from fraudstream.console.rules import RulesAccess
    from fraudstream.console.verdicts import VerdictWriter

    users = Users.load(users_file) if users_file else None
    if users is None and not _loopback_only(host, is_loopback):
        raise ConfigError(
            f"--host {host} serves other machines: give --users FILE (no anonymous access "
            "except on the loopback interface)"
        )
    if index_file is None:
        index_file = Path(tempfile.mkdtemp(prefix="fraudstream-console-")) / "index.sqlite"
    for stale in (index_file, Path(f"{index_file}-wal"), Path(f"{index_file}-shm")):
        stale.unlink(missing_ok=True)  # rebuilt from the topics: never trust a previous run's file
    index = Index(index_file)
    rules = RulesAccess(settings)
    state = ConsoleState(
        settings=settings,
        index=index,
        authenticator=Authenticator(users, anonymous_name=getpass.getuser()),
        writer=VerdictWriter(settings),
        rules_writer=rules.write,
        rules_reader=rules.read,
    )
    state.reader = TopicReader(settings, index, on_alerts=state.publish, on_verdicts=state.publish_verdicts)
    if start_reader:
        state.reader.start()
    return state


def _loopback_only(host: str, is_loopback) -> bool:
    return host == "localhost" or is_loopback(host)


def start_in_thread(
    settings: Settings, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **options: Any
) -> RunningConsole:
    """Serve the console from a thread of this process (the demo and the tests do)."""
    import threading
    import time

    import uvicorn

    from fraudstream.console.app import create_app

    state = build_state(settings, host=host, **options)
    server = uvicorn.Server(
        uvicorn.Config(create_app(state), host=host, port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, name="console-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            state.reader.stop()
            raise ConfigError(f"the console could not listen on {host}:{port}")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1] if port == 0 else port
    return RunningConsole(state, server, thread, f"http://{host}:{bound}")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.hash_password:
        from fraudstream.console.auth import hash_password

        password = sys.stdin.readline().rstrip("\n")
        if not password:
            raise ConfigError("--hash-password reads the password from stdin: nothing was given")
        print(hash_password(password))
        return 0
    try:
        import uvicorn

        from fraudstream.console.app import create_app
    except ImportError as exc:
        raise ConfigError(
            f"the console needs its extra: pip install 'fraudstream[console]' ({exc.name} is missing)"
        ) from None
    from fraudstream.kafka import check_secured_connection

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the registry client's every request otherwise
    logging.getLogger("fraudstream.librdkafka").setLevel(logging.CRITICAL)  # the pages show a lost connection
    check_secured_connection(settings)
    state = build_state(
        settings,
        users_file=args.users,
        host=args.host,
        index_file=args.index,
    )
    print(
        f"fraudstream console: http://{args.host}:{args.port} (reading {settings.fraud_topic}, "
        f"{settings.labels_topic}, {settings.legit_topic}, {settings.rules_topic})",
        flush=True,
    )
    try:
        uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning", access_log=False)
    finally:
        state.reader.stop()
        state.writer.close()
    return 0
