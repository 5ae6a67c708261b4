"""The `haulage` command: a thin front over the public API, one module per command group (see cli/main.py)."""
