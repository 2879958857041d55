"""Package data: installed as fraudstream._schemas (see pyproject.toml), read with importlib.resources."""
