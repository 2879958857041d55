"""Package data: installed as fraudstream._infra (see pyproject.toml), read with importlib.resources."""
