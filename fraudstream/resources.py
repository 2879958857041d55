"""The data files the package reads at run time: the Avro schemas, the local stack's templates and the
default rules. They live in the repository's top-level folders schemas/, infra/ and rules/, which
pyproject.toml installs as the packages fraudstream._schemas, fraudstream._infra and fraudstream._rules:
the same lookup works from a checkout, an editable install and a wheel."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

_PACKAGES = {"schemas": "fraudstream._schemas", "infra": "fraudstream._infra", "rules": "fraudstream._rules"}


def resource_dir(name: str) -> Path:
    """The folder of one kind of data file ("schemas", "infra" or "rules").

    pip installs wheels unpacked, so the package's files are real files: a Path, which the schema
    loader, the template renderer and the rules loader (and the user, in error messages) can use."""
    folder = files(_PACKAGES[name])
    if not isinstance(folder, Path):
        raise RuntimeError(f"fraudstream's {name} are not files on disk ({folder!r}); install it unzipped")
    return folder
