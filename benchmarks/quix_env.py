"""The quixstreams contender's own virtual environment, created from PyPI on first use and reused after.

quixstreams 3.x pins confluent-kafka below 2.13 and the project pins 2.16.1, so the two cannot
share .venv. The environment is built from benchmarks/quix-requirements.txt (every package pinned)
and remembers that file's hash: a changed file rebuilds it, an unchanged one costs nothing.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from fraudstream.errors import FraudstreamError
from fraudstream.settings import PROJECT_ROOT

REQUIREMENTS = PROJECT_ROOT / "benchmarks" / "quix-requirements.txt"
DEFAULT_VENV = PROJECT_ROOT / ".venv-quix"
MARKER = ".requirements-sha256"
INSTALL_TIMEOUT_S = 900.0


class EnvironmentFailed(FraudstreamError):
    """The contender's environment could not be created (PyPI unreachable, a pin gone, ...)."""


def requirements_hash() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()


def python_in(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path = DEFAULT_VENV, *, log=print) -> Path:
    """The environment's Python, after creating or rebuilding the environment if needed."""
    wanted = requirements_hash()
    marker = venv / MARKER
    if python_in(venv).exists() and marker.exists() and marker.read_text().strip() == wanted:
        return python_in(venv)
    log(f"creating the quixstreams environment in {venv} from {REQUIREMENTS.name} (once; about 2 minutes) ...")
    shutil.rmtree(venv, ignore_errors=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [
            str(python_in(venv)),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--requirement",
            str(REQUIREMENTS),
        ],
    ]
    for argv in steps:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise EnvironmentFailed(
                f"creating {venv} timed out after {INSTALL_TIMEOUT_S:.0f}s: {' '.join(argv)}"
            ) from exc
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise EnvironmentFailed(f"creating {venv} failed ({' '.join(argv[:3])} ...): {last[0]}")
    marker.write_text(wanted + "\n")
    return python_in(venv)
