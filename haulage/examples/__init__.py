"""Shipped example workflows: ``plan_review`` (dynamic fan-out) and ``bulk_invoices`` (partial failure).

Load them with HAULAGE_MODULES=haulage.examples (the default of `haulage dev`).
"""

from __future__ import annotations

from haulage.examples.bulk_invoices import SAMPLE_BATCH, bulk_invoices
from haulage.examples.plan_review import plan_review

__all__ = ["plan_review", "bulk_invoices", "SAMPLE_BATCH"]
