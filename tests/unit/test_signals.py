"""The one signal handler (fraudstream.signals.stop_requests) without exit_on_second, as the demo uses it:
the first signal asks for an orderly stop, the second for stopping at once, both seen while the main
thread blocks in C. (The exit-at-once variant is tested with the detector, test_detector_loop.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from fraudstream.settings import PROJECT_ROOT


def test_first_signal_sets_stop_and_the_second_sets_now_during_a_blocking_call():
    script = textwrap.dedent("""
        import signal, threading
        from fraudstream.signals import stop_requests
        # Whatever they were (a job started in the background by a shell inherits SIGINT ignored).
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        with stop_requests() as (stop, now):
            seen = threading.Thread(target=lambda: (stop.wait(), print("stop", flush=True), now.wait(),
                                                    print("now", flush=True)), daemon=True)
            seen.start()
            print("ready", flush=True)
            seen.join(30)  # blocks in C: the handlers still run
            print("left", stop.is_set(), now.is_set(), flush=True)
        print("restored", (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before, flush=True)
    """)
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGTERM)
        assert process.stdout.readline().strip() == "stop"
        process.send_signal(signal.SIGINT)
        assert process.stdout.readline().strip() == "now"
        rest = process.stdout.read().split("\n")
        assert process.wait(timeout=20) == 0, process.stderr.read()
        assert "left True True" in rest and "restored True" in rest  # previous handlers back afterwards
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
