"""How long a Lambda may still work, and how long to wait before a retry.

Both the ingest sender and the consumer's http sink retry transient failures
with full-jitter exponential backoff inside the Lambda's remaining time; the
two rules live here once.
"""
from __future__ import annotations

import math
import random
import time
from typing import Any


def remaining_seconds(context: Any) -> float:
    """Seconds the Lambda has left; infinite without a Lambda context (tests, tools)."""
    remaining_ms = getattr(context, "get_remaining_time_in_millis", None)
    return math.inf if remaining_ms is None else remaining_ms() / 1000


def wait_before_retry(attempt: int, deadline: float, first: float, cap: float) -> bool:
    """Sleep a full-jitter exponential pause before retry number ``attempt`` (0-based).

    Returns False, without sleeping, when the pause would reach ``deadline``
    (a ``time.monotonic()`` value): the caller gives up now rather than later.
    """
    pause = random.uniform(0, min(cap, first * 2**attempt))
    if time.monotonic() + pause >= deadline:
        return False
    time.sleep(pause)
    return True
