"""This deployment's workflows: the package HAULAGE_MODULES names in docker-compose.yml and the Dockerfile.

Haulage itself is the installed ``haulage`` package; this folder is what a
deployment edits. Add a module per workflow here (``from haulage import step,
workflow, chain, fan_out``) and import it below; workers, beat, the API and the
CLI load this package at start-up, so every workflow in it is registered by name.
"""

from __future__ import annotations

# The shipped examples (plan_review, bulk_invoices), so a fresh deployment has something to run.
import haulage.examples  # noqa: F401
