"""``python -m api``: serve the HTTP service (see api/server.py)."""

from __future__ import annotations

import sys

from api.server import main

sys.exit(main())
