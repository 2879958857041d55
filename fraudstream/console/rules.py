"""The rules page's reads and writes, through the rules CLI's own code (`fraudstream rules list`, `history`,
`set`): no second reader or writer of the rules topic."""

from __future__ import annotations

import json
from typing import Any

from fraudstream.consumer.rules_topic import REFUSED, RulesCodec, read_changes
from fraudstream.records import Rule
from fraudstream.rules_cli import write_rules_text
from fraudstream.settings import Settings

EDITOR = "the rule editor"


class RulesAccess:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._codec: RulesCodec | None = None

    @property
    def codec(self) -> RulesCodec:
        if self._codec is None:
            self._codec = RulesCodec(self.settings)
        return self._codec

    def read(self) -> tuple[dict[str, Rule], list[dict[str, Any]]]:
        """The rules in force (as `rules list` shows them) and every record of the topic, newest first, each
        with what it changed from the rule's previous version."""
        in_force, changes = read_changes(self.settings, self.codec)  # judged as a detector judges them
        history: list[dict[str, Any]] = []
        previous: dict[str, Rule] = {}
        for change in changes:
            message, record = change.message, change.record
            rule_id = (message.key() or b"").decode("utf-8", "replace")
            why = f"{change.outcome}: {change.reason}" if change.outcome == REFUSED else change.outcome
            history.append(
                {
                    "offset": message.offset(),
                    "id": rule_id,
                    "record": record if change.outcome != REFUSED else None,
                    "why": why,
                    "change": describe_change(previous.get(rule_id), record) if record else "",
                }
            )
            if record is not None and change.outcome != REFUSED:
                previous[rule_id] = record
        return in_force, history[::-1]

    def write(self, text: str, author: str, comment: str) -> list[Rule]:
        return write_rules_text(
            self.settings, text, EDITOR, author=author, comment=comment, codec=self.codec, only_changed=True
        )


def describe_change(before: Rule | None, after: Rule) -> str:
    if before is None:
        return f"created ({after.kind}, {'enabled' if after.enabled else 'disabled'}) " + json.dumps(
            after.to_dict()["parameters"], sort_keys=True
        )
    changes = []
    if before.enabled != after.enabled:
        changes.append("enabled" if after.enabled else "disabled")
    if before.kind != after.kind:
        changes.append(f"kind {before.kind} → {after.kind}")
    for key in sorted(before.parameters.keys() | after.parameters.keys()):
        old, new = before.parameters.get(key), after.parameters.get(key)
        if old != new:
            changes.append(f"{key} {_show(old)} → {_show(new)}")
    return ", ".join(changes) or "no change"


def _show(value: Any) -> str:
    if value is None:
        return "(default)"
    return json.dumps(list(value) if isinstance(value, tuple) else value)
