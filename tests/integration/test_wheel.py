"""The package as a user installs it: a wheel built from the sources, installed into a fresh virtual
environment outside the repository, run from another directory against the test stack.

The wheel is built from a copy of the sources (a stale build/ folder in the checkout could otherwise
ship files that no longer exist). Its dependencies are not downloaded again: the fresh environment
sees the test environment's site-packages through a .pth file, whose own .pth files (the editable
install's finder among them) Python does not process, so `fraudstream` can only come from the wheel.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from fraudstream.schemas import SCHEMA_FILES
from fraudstream.settings import PROJECT_ROOT, Settings
from tests.integration.test_detector import routed_total
from tests.support.kafka_io import wait_until

# What a clean clone holds that the build does not need (or must not see).
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", ".stack", "build", "*.egg-info", "__pycache__", ".pytest_cache", "tests", "benchmarks"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    sources = work / "sources"
    shutil.copytree(PROJECT_ROOT, sources, ignore=NOT_SOURCES)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "--wheel-dir",
            str(work / "dist"),
            str(sources),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    (found,) = (work / "dist").glob("fraudstream-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory) -> Path:
    """The fresh environment's bin/ folder, fraudstream installed into it from the wheel."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working directory with nothing of the repository in it."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


def user_env(tmp_path: Path, settings: Settings | None = None) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("FRAUDSTREAM_") and key not in ("PYTHONPATH", "XDG_DATA_HOME")
    }
    env["HOME"] = str(tmp_path / "home")
    if settings is not None:
        env |= {
            "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "SCHEMA_REGISTRY_URL": settings.schema_registry_url,
        }
    else:
        env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
        env.pop("SCHEMA_REGISTRY_URL", None)
    return env


def test_the_wheel_holds_one_top_level_package_with_its_data(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"fraudstream", wheel.name.split("-py3")[0] + ".dist-info"}
    for expected in (
        "fraudstream/producer/loop.py",
        "fraudstream/consumer/detector.py",
        "fraudstream/consumer/tasks.py",
        "fraudstream/consumer/state/recovery.py",
        "fraudstream/_schemas/transaction.avsc",
        "fraudstream/_schemas/history/transaction/v1.avsc",
        "fraudstream/_infra/pom.xml",
        "fraudstream/_infra/kafka-server.properties",
        "fraudstream/_rules/default.toml",
        "fraudstream/console/app.py",
        "fraudstream/console/templates/queue.html",
        "fraudstream/console/static/console.js",
        "fraudstream/_schemas/history/label/v2.avsc",
    ):
        assert expected in names


def test_installed_commands_run_from_another_directory(installed: Path, elsewhere: Path, tmp_path: Path):
    env = user_env(tmp_path)
    where = subprocess.run(
        [
            str(installed / "python"),
            "-c",
            "import fraudstream.consumer.detector as d, fraudstream.resources as r; "
            "print(d.__file__); print(r.resource_dir('schemas'))",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.returncode == 0, where.stderr
    venv = str(installed.parent)
    assert all(line.startswith(venv) for line in where.stdout.split()), where.stdout  # the wheel's, not the checkout's

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(installed / "fraudstream"), *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
        )

    helped = run("--help")
    assert helped.returncode == 0 and "produce" in helped.stdout and "detect" in helped.stdout
    checked = run("schemas", "check-offline")
    assert checked.returncode == 0, checked.stderr
    assert [line.split()[:2] for line in checked.stdout.splitlines()] == [["ok", name] for name in SCHEMA_FILES]
    # No stack here: one status line each, exit 3, and the stack's folder is the user's, not the package's.
    status = run("stack", "status")
    assert status.returncode == 3 and "Traceback" not in status.stderr, status.stderr
    data_dir = subprocess.run(
        [str(installed / "python"), "-c", "from fraudstream.settings import Settings; print(Settings().stack_dir)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert data_dir == str(tmp_path / "home" / ".local" / "share" / "fraudstream" / "stack")


def test_installed_produce_then_detect_round_trip(installed: Path, elsewhere: Path, tmp_path: Path, pipeline: Settings):
    env = user_env(tmp_path, pipeline)
    count = 200
    produced = subprocess.run(
        [
            str(installed / "fraudstream"),
            "produce",
            "--topic",
            pipeline.transactions_topic,
            "--count",
            str(count),
            "--rate",
            "0",
            "--no-labels",
            "--quiet",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert produced.returncode == 0, produced.stderr
    detector = subprocess.Popen(
        [
            str(installed / "fraudstream"),
            "detect",
            "--topic",
            pipeline.transactions_topic,
            "--group-id",
            pipeline.group_id,
            "--log-interval",
            "1",
        ],
        cwd=elsewhere,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # A detector that stops early (no rules file, no schemas) ends the wait at once.
        wait_until(
            lambda: detector.poll() is not None or routed_total(pipeline) >= count,
            timeout_s=120,
            what="every record routed",
        )
        assert detector.poll() is None, detector.stdout.read()
    finally:
        detector.send_signal(signal.SIGTERM)
        output, _ = detector.communicate(timeout=60)
    assert detector.returncode == 0, output
    assert f"stopped: consumed={count} " in output, output
    assert routed_total(pipeline) == count
