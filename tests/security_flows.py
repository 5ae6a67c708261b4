"""Workflows for the security tests of the HTTP service (tests/integration/test_api_security.py).

Their steps run on the ``sec`` queue, which only that module's own worker consumes.
"""

from __future__ import annotations

from typing import Any

from haulage.tasks import StepContext, step
from haulage.workflows import chain, fan_out, workflow

QUEUE = "sec"


@step(queue=QUEUE, retries=0)
def sec_item(ctx: StepContext, secret: str, fail: bool = False) -> str:
    """Fails when told to; its message never names the secret (a leak would come from the parameters)."""
    if fail:
        raise ValueError("this item was told to fail")
    return "ok"


@workflow("t_sec_fan")
def t_sec_fan(secrets: list[str], fail_index: int = 0) -> Any:
    """One item per secret; the item at ``fail_index`` fails, so its parameters become a Failure."""
    return chain(fan_out(sec_item, [{"secret": s, "fail": i == fail_index} for i, s in enumerate(secrets)]))


@workflow("t_sec_small", max_params_bytes=1024)
def t_sec_small(text: str) -> Any:
    """Takes at most 1 KiB of parameters (its own cap, below HAULAGE_MAX_PARAMS_BYTES)."""
    return chain(sec_item.s(secret=text))
