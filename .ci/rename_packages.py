#!/usr/bin/env python3
"""Rename the top-level packages `producer` and `consumer` to `fraudstream.producer` and
`fraudstream.consumer` in every tracked text file (code, tests, benchmarks, docs).

The folders stay where they are (pyproject.toml maps them with setuptools' package-dir); only the
names code and docs use to import or run them change. Idempotent: a second run changes nothing.

    python3 .ci/rename_packages.py          # rewrite in place, list the files changed
    python3 .ci/rename_packages.py --check  # exit 1 if anything is left to rename
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("consumer", "producer")
# pyproject.toml maps the folders to the new names by hand (package-dir); the old names stay there.
SKIP = {Path(__file__).resolve(), ROOT / "pyproject.toml"}


def submodules(package: str) -> list[str]:
    """Module and subpackage names directly inside a package folder (consumer/state -> 'state')."""
    folder = ROOT / package
    names = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return sorted(names, key=len, reverse=True)


def rules() -> list[tuple[re.Pattern, str]]:
    pkgs = "|".join(PACKAGES)
    found = []
    # import statements: `from consumer.x import y`, `from producer import handbook`, `import consumer.decide`
    found.append((re.compile(rf"^(\s*)from ({pkgs})((?:\.\w+)*) import ", re.M), r"\1from fraudstream.\2\3 import "))
    found.append((re.compile(rf"^(\s*)import ({pkgs})((?:\.\w+)*)\b", re.M), r"\1import fraudstream.\2\3"))
    # running a package: `python -m consumer`, `python -m consumer.quality`, ["-m", "producer", ...]
    found.append((re.compile(rf"(python3? -m )({pkgs})\b"), r"\1fraudstream.\2"))
    found.append((re.compile(rf"""(["']-m["'],\s*["'])({pkgs})\b"""), r"\1fraudstream.\2"))
    # dotted module names in code, strings (monkeypatch targets, CLI module tables) and docs:
    # consumer.detector, producer.loop.produce; not attributes (self.consumer.x) nor already renamed names
    for package in PACKAGES:
        modules = "|".join(map(re.escape, submodules(package)))
        found.append((re.compile(rf"(?<![\w./-])({package})\.({modules})\b"), r"fraudstream.\1.\2"))
        # a module reached through another module's import: benchmarks.decide.consumer.decide
        found.append((re.compile(rf"(\bbenchmarks\.\w+\.)({package})\.({modules})\b"), r"\1fraudstream.\2.\3"))
    return found


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.split(b"\0")
    files = []
    for name in filter(None, names):
        path = ROOT / name.decode()
        if path.resolve() in SKIP or not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def rewrite(text: str, patterns: list[tuple[re.Pattern, str]]) -> str:
    for pattern, replacement in patterns:
        text = pattern.sub(replacement, text)
    return text


def main() -> int:
    check = "--check" in sys.argv[1:]
    patterns = rules()
    changed = []
    for path in tracked_text_files():
        text = path.read_text(encoding="utf-8")
        new = rewrite(text, patterns)
        if new != text:
            changed.append(path.relative_to(ROOT))
            if not check:
                path.write_text(new, encoding="utf-8")
    for path in changed:
        print(path)
    if check and changed:
        print(f"{len(changed)} file(s) still use the old package names", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
