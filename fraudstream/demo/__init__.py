"""`fraudstream demo`: the whole pipeline in one command, with a live view.

Starts the local stack unless the environment (or flags) point at a cluster, creates the topics,
registers the schemas, then runs `fraudstream produce` and N `fraudstream detect` processes side
by side as child processes. A read_committed consumer of its own follows every topic from where
it was when the demo began and builds the live view: throughput, legit / fraud / dead-letter
counts, detection against the generator's labels, the latest fraud alerts with the rules that
fired. On a terminal the view redraws in place (plain ANSI codes); otherwise it prints one plain
line every few seconds.

Stopping (after --duration, or at Ctrl-C / SIGTERM): stop the producer, wait (bounded) until the
detectors have routed every record produced, then SIGTERM the detectors, which commit or abort
their open batch and exit. The summary ends with one `summary: key=value ...` line for scripts,
and the `fraudstream inspect` commands to look further. The local stack is left running (the
inspect commands need it) unless --stop-stack is given and the demo started it.

Modules, by concern: options (flags and defaults), scoring (counts and detection against the
labels), view (the live panel or progress lines), watcher (the view's own consumer),
bad_records (the malformed records slipped in), children (the producer and detector processes),
pipeline (running it all), summary (the report at the end).
"""

from fraudstream.demo.options import add_arguments
from fraudstream.demo.pipeline import DemoFailed, run

__all__ = ["DemoFailed", "add_arguments", "run"]
