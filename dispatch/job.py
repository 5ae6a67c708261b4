"""``python -m dispatch.job``: the same entry point as ``python -m haulage.dispatch.job``."""

from __future__ import annotations

import sys

from haulage.dispatch.job import main

if __name__ == "__main__":
    sys.exit(main())
