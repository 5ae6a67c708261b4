"""``python -m haulage.api``: serve the HTTP service (see api/server.py)."""

from __future__ import annotations

import sys

from haulage.api.server import main

sys.exit(main())
