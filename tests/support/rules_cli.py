"""`fraudstream rules ...` run in-process against a test's topic, broker and registry."""

from __future__ import annotations

from fraudstream.cli import main as fraudstream
from fraudstream.settings import Settings


def rules_command(settings: Settings, *args: str) -> int:
    """The exit status of `fraudstream rules ARGS` on settings' topic."""
    return fraudstream(
        [
            "rules",
            *args,
            "--topic",
            settings.transactions_topic,
            "--bootstrap-servers",
            settings.bootstrap_servers,
            "--schema-registry-url",
            settings.schema_registry_url,
        ]
    )
