"""``python -m dispatch.job``: the same entry point as ``python -I -m haulage.dispatch.job``.

Deployments run the latter: ``-I`` (which keeps ``PYTHON*`` variables from
running code before the job starts) also drops the current folder and
PYTHONPATH from ``sys.path``, so this top-level package of the repository is
not importable there, while the installed ``haulage`` package is.
"""

from __future__ import annotations

import sys

from haulage.dispatch.job import main

if __name__ == "__main__":
    sys.exit(main())
