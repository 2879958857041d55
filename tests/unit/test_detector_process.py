"""The supervised detector of the broker fault tests is restarted after librdkafka's known abort, and after
nothing else: any other exit still fails the test."""

from __future__ import annotations

import signal
import sys

import pytest

from fraudstream.settings import Settings
from tests.support.detector_process import LIBRDKAFKA_ABORT, DetectorProcess

ABORTS_LIKE_LIBRDKAFKA = (
    f"import os, sys; print('python: rdkafka_queue.h:1086: {LIBRDKAFKA_ABORT}: Assertion', flush=True); os.abort()"
)


def stand_in(tmp_path, code: str) -> DetectorProcess:
    detector = DetectorProcess(Settings(), tmp_path / "detector.log", supervised=True)
    detector.ensure_ended()
    detector.argv = [sys.executable, "-c", code]
    detector._start()
    detector.process.wait(30)
    return detector


def test_a_supervised_detector_is_restarted_after_librdkafka_s_abort(tmp_path):
    detector = stand_in(tmp_path, ABORTS_LIKE_LIBRDKAFKA)
    assert detector.process.returncode == -signal.SIGABRT
    detector.argv = [sys.executable, "-c", "import time; time.sleep(30)"]
    detector.assert_running()
    assert detector.restarts == 1 and detector.process.poll() is None
    detector.ensure_ended()


STUCK_LIKE_THE_DETECTOR = (
    "import faulthandler, sys, time; faulthandler.dump_traceback_later(0.1, exit=True, file=sys.stdout); time.sleep(5)"
)


def test_a_supervised_detector_is_restarted_after_its_own_exit_on_a_stuck_call(tmp_path):
    detector = stand_in(tmp_path, STUCK_LIKE_THE_DETECTOR)
    assert detector.process.returncode == 1
    detector.argv = [sys.executable, "-c", "import time; time.sleep(30)"]
    detector.assert_running()
    assert detector.restarts == 1 and detector.process.poll() is None
    detector.ensure_ended()


@pytest.mark.parametrize("code", ["import os; os.abort()", "raise SystemExit(1)"])
def test_any_other_exit_still_fails(tmp_path, code):
    detector = stand_in(tmp_path, code)
    with pytest.raises(AssertionError, match="the detector exited"):
        detector.assert_running()
    assert detector.restarts == 0
