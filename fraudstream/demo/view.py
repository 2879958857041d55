"""Rendering, pure apart from the terminal: the live panel redrawn in place, or one plain line every few seconds."""

from __future__ import annotations

import os
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from fraudstream.demo.scoring import DemoState

TTY_REDRAW_S = 0.5
RATE_WINDOW_S = 3.0


class RateMeter:
    """Records per second over the last few seconds, from (time, total) samples."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, total: int) -> None:
        self.samples.append((now, total))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()

    def per_second(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


@dataclass(frozen=True, slots=True)
class Frame:
    """Everything one view refresh shows."""

    topic: str
    detectors: int
    rate: int
    duration_s: float
    elapsed_s: float
    phase: str
    state: DemoState
    in_per_s: float
    out_per_s: float


def pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def money(cents: int, currency: str) -> str:
    return f"{cents / 100:,.2f} {currency}"


def plain_line(frame: Frame) -> str:
    """One self-contained progress line (not a terminal: logs, CI, pipes)."""
    c, s = frame.state.counts, frame.state.score
    return (
        f"[{frame.elapsed_s:6.1f}s] {frame.phase}: produced={c.produced} ({frame.in_per_s:.0f}/s) "
        f"legit={c.legit} fraud={c.fraud} dead_letter={c.dead_letter} in_flight={c.in_flight} "
        f"true_positives={s.true_positives} false_positives={s.false_positives} "
        f"false_negatives={s.false_negatives}"
    )


def panel_lines(frame: Frame) -> list[str]:
    """The live panel, one string per screen line (no colour; the view adds it)."""
    c, s = frame.state.counts, frame.state.score
    traffic = "until Ctrl-C" if frame.duration_s == 0 else f"for {frame.duration_s:g}s"
    until = f"{frame.elapsed_s:5.1f}s (traffic {traffic})"
    detectors = f"{frame.detectors} detector{'s' if frame.detectors > 1 else ''}"
    lines = [
        f"fraudstream demo  topic {frame.topic}  {detectors}  {frame.rate}/s  {until}  [{frame.phase}]",
        f"  transactions  produced {c.produced:,}  in {frame.in_per_s:,.0f}/s   routed {c.routed:,}  "
        f"out {frame.out_per_s:,.0f}/s   in flight {c.in_flight:,}"
        + (f" (incl. {c.backlog:,} from before)" if c.backlog else ""),
        f"  routed        legit {c.legit:,} ({pct(c.legit, c.routed)})   fraud {c.fraud:,} ({pct(c.fraud, c.routed)})   "
        f"dead-letter {c.dead_letter:,} ({pct(c.dead_letter, c.routed)})",
        f"  vs labels     true positives {s.true_positives:,}   false positives {s.false_positives:,}   "
        f"missed frauds {s.false_negatives:,}   precision {ratio(s.precision)}   recall {ratio(s.recall)}"
        + (f"   (awaiting labels {s.awaiting_labels:,})" if s.awaiting_labels else ""),
        "  latest fraud alerts" + ("" if frame.state.latest_alerts else "  (none yet)"),
    ]
    for alert in frame.state.latest_alerts:
        verdict = s.verdict(alert.transaction_id)
        truth = "label pending" if verdict is None else "fraud (labelled)" if verdict else "FALSE POSITIVE"
        lines.append(
            f"    {alert.detected_at:%H:%M:%S}  {alert.account_id:<14} {money(alert.amount_cents, alert.currency):>14}  "
            f"{alert.channel:<12} {alert.country:<3} rules: {', '.join(alert.rules):<28} {truth}"
        )
    if frame.state.rule_changes:
        lines.append("  rule changes (fraudstream rules)")
        lines += [f"    {line}" for line in frame.state.rule_changes]
    if frame.phase == "producing":
        lines.append("  Ctrl-C: stop the producer, let the detectors finish, print a summary")
    return lines


class LiveView:
    """A panel redrawn in place on a terminal; one plain line every `interval_s` anywhere else."""

    def __init__(
        self, out: TextIO, *, interactive: bool, interval_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.out = out
        self.interactive = interactive
        self.interval_s = interval_s if not interactive else TTY_REDRAW_S
        self.clock = clock
        self._last_draw: float | None = None
        self._drawn_lines = 0

    @staticmethod
    def is_terminal(out: TextIO) -> bool:
        return out.isatty() and os.environ.get("TERM", "") != "dumb"

    def update(self, frame: Frame, *, force: bool = False) -> None:
        now = self.clock()
        if not force and self._last_draw is not None and now - self._last_draw < self.interval_s:
            return
        self._last_draw = now
        if self.interactive:
            self._redraw(panel_lines(frame))
        else:
            self.out.write(plain_line(frame) + "\n")
        self.out.flush()

    def _redraw(self, lines: list[str]) -> None:
        width = max(20, shutil.get_terminal_size((120, 24)).columns - 1)
        parts = []
        if self._drawn_lines:
            parts.append(f"\x1b[{self._drawn_lines}F")  # back to the first line of the previous panel
        else:
            parts.append("\x1b[?25l")  # hide the cursor while redrawing
        for index, line in enumerate(lines):
            text = line[:width]  # a wrapped line would break the cursor arithmetic
            parts.append(f"\x1b[1m{text}\x1b[0m" if index == 0 else text)
            parts.append("\x1b[K\n")
        parts.append("\x1b[J")  # clear what a longer previous panel left below
        self.out.write("".join(parts))
        self._drawn_lines = len(lines)

    def close(self) -> None:
        if self.interactive and self._drawn_lines:
            self.out.write("\x1b[?25h")
            self.out.flush()
