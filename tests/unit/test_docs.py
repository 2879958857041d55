"""The documentation site builds offline, strictly, and its generated reference covers the code.

This is how CI builds the docs (`make docs` runs the same `mkdocs build --strict`): a broken link or anchor,
a module without a docstring, or any other warning fails it. The build runs with the network switched off
in its process, so a theme or plugin that fetches anything fails here rather than on a machine offline.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fraudstream.cli import build_parser
from fraudstream.settings import ENV, PROJECT_ROOT

# mkdocs run in a process whose sockets cannot connect or resolve a name: any fetch is an error.
OFFLINE_MKDOCS = """
import socket, sys

def offline(*args, **kwargs):
    raise OSError("network access during the docs build: the site must build offline")

socket.socket.connect = socket.socket.connect_ex = offline
socket.create_connection = socket.getaddrinfo = offline
from mkdocs.__main__ import cli
cli.main(args=sys.argv[1:], prog_name="mkdocs")
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            OFFLINE_MKDOCS,
            "build",
            "--strict",
            "--config-file",
            str(PROJECT_ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site_dir),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1", "HOME": str(site_dir)},
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return site_dir


def page_text(site: Path, page: str) -> str:
    return html.unescape((site / page / "index.html").read_text())


def command_paths(parser: argparse.ArgumentParser, path: list[str]):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from command_paths(sub, path + [name])


def test_the_cli_reference_has_every_command_and_every_option(site: Path) -> None:
    text = page_text(site, "reference/cli")
    paths = list(command_paths(build_parser(), ["fraudstream"]))
    assert len(paths) > 10  # every subcommand, and the rules subcommands under `fraudstream rules`
    for path, parser in paths:
        anchor = "-".join(path)
        assert f'id="{anchor}"' in text, f"no section for {' '.join(path)}"
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings:
                assert option in text, f"{option} of {' '.join(path)} is missing"


def test_the_environment_reference_has_every_variable_with_its_default(site: Path) -> None:
    text = page_text(site, "reference/environment")
    for variable in ENV.values():
        assert variable in text, variable
    assert "fraudstream-detector" in text and "FULL_TRANSITIVE" in text  # defaults, from Settings


def test_the_schema_reference_has_every_record_and_field(site: Path) -> None:
    text = page_text(site, "reference/schemas")
    for path in (PROJECT_ROOT / "schemas").glob("*.avsc"):
        schema = json.loads(path.read_text())
        assert f'id="{schema["name"].lower()}"' in text, schema["name"]
        for field in schema["fields"]:  # a row of the fields table, not only the schema's JSON beside it
            assert f"<td><code>{field['name']}</code></td>" in text, f"{schema['name']}.{field['name']}"


def test_the_benchmark_results_come_from_benchmarks_results(site: Path) -> None:
    latest = (PROJECT_ROOT / "benchmarks" / "results" / "latest.md").read_text()
    commit = re.search(r"at commit `([0-9a-f]+)`", latest).group(1)
    text = page_text(site, "benchmarks/results")
    assert commit in text
    for chart in (PROJECT_ROOT / "benchmarks" / "results").glob("latest-*.png"):
        assert (site / "benchmarks" / chart.name).read_bytes() == chart.read_bytes()
        assert f'src="../{chart.name}"' in (site / "benchmarks" / "results" / "index.html").read_text()


def test_the_module_map_lists_every_module(site: Path) -> None:
    text = page_text(site, "concepts/architecture")
    for folder in ("fraudstream", "producer", "consumer", "consumer/state"):
        for path in (PROJECT_ROOT / folder).glob("*.py"):
            if path.name not in ("__init__.py", "__main__.py"):
                assert f"{folder}/{path.name}" in text, path


def test_no_page_loads_anything_from_the_network(site: Path) -> None:
    for page in site.rglob("*.html"):
        source = page.read_text()
        assert not re.search(r'<script[^>]+src="(https?:)?//', source), page
        assert not re.search(r'<link[^>]+rel="stylesheet"[^>]+href="(https?:)?//', source), page


def test_readings_written_for_another_run_say_so() -> None:
    sys.path.insert(0, str(PROJECT_ROOT / "docs" / "hooks"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    measured = generate.benchmark_commit()
    assert measured
    for written_for, warned in ((measured, False), ("0000000", True)):
        page = f"# Reading the figures\n\n<!-- readings of the run at commit `{written_for}` -->\n\nOurs routed ..."
        shown = generate.on_page_markdown(page, None, None, None)
        assert ("Written for another run" in shown) is warned, written_for
