"""The `haulage` command: a thin front over workflows/ (see cli/main.py)."""
