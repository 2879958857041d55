"""Package data: installed as fraudstream._rules (see pyproject.toml), read with importlib.resources."""
