"""Ctrl-C and SIGTERM for every long-running command: the first asks for an orderly stop, the second for
stopping at once. The one place the project installs signal handlers."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger("fraudstream.signals")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_AT_ONCE = 130  # the shell's status for a process ended by SIGINT


@contextlib.contextmanager
def stop_requests(
    stop: threading.Event | None = None, *, exit_on_second: str | None = None, signals=STOP_SIGNALS
) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Yield (stop, now): the first SIGINT/SIGTERM sets `stop`, the second sets `now`.

    With `exit_on_second` (the program's name), the second signal instead ends the process at once
    (status 130) after one line on stderr: for commands with nothing left to clean up by then.

    Signals are read on a thread from Python's wake-up fd: the main thread may be inside a blocking
    librdkafka call, where a Python-level handler would only run once that call returns. Off the main
    thread no handler can be installed: the events are yielded and only the caller sets them.
    """
    stop = stop if stop is not None else threading.Event()
    now = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop, now
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = {signum: signal.signal(signum, lambda *_: None) for signum in signals}
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    wanted = {int(signum) for signum in signals}

    def watch() -> None:
        while data := os.read(read_fd, 64):
            for signum in data:
                if signum not in wanted:
                    continue
                if not stop.is_set():
                    log.info("stopping on %s (send it again to stop at once)", signal.Signals(signum).name)
                    stop.set()
                elif exit_on_second:
                    os.write(2, f"{exit_on_second}: second signal, exiting at once\n".encode())
                    os._exit(EXIT_AT_ONCE)
                else:
                    now.set()

    watcher = threading.Thread(target=watch, name="signal-watcher", daemon=True)
    watcher.start()
    try:
        yield stop, now
    finally:
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(write_fd)  # ends the watcher's read
        watcher.join(5)
        os.close(read_fd)
