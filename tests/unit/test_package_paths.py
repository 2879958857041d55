"""Where the package finds its data files and where the local stack keeps its own: from a checkout,
the repository's folders; installed from a wheel, package data and a per-user data directory."""

from __future__ import annotations

from pathlib import Path

import fraudstream.settings as settings_module
from fraudstream.resources import resource_dir
from fraudstream.settings import ENV, PROJECT_ROOT, Settings


def test_data_files_are_read_through_importlib_resources_from_the_repository_folders():
    assert resource_dir("schemas") == PROJECT_ROOT / "schemas"  # an editable install maps the packages here
    assert Settings().schemas_dir == resource_dir("schemas")
    assert Settings().rules_file == resource_dir("rules") / "default.toml"
    assert (resource_dir("infra") / "pom.xml").is_file()


def test_from_a_checkout_the_stack_lives_in_dot_stack():
    assert Settings().stack_dir == PROJECT_ROOT / ".stack"


def test_installed_the_stack_lives_in_the_per_user_data_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(settings_module, "PROJECT_ROOT", tmp_path / "site-packages")  # no pyproject.toml there
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert Settings().stack_dir == tmp_path / "data" / "fraudstream" / "stack"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Settings().stack_dir == tmp_path / "home" / ".local" / "share" / "fraudstream" / "stack"


def test_the_environment_still_chooses_the_stack_dir(tmp_path):
    assert Settings.from_env({ENV["stack_dir"]: str(tmp_path)}).stack_dir == Path(tmp_path)
