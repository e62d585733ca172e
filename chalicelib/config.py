"""Settings read once per Lambda container from environment variables.

Every knob of the contract lives here, with its default, so the rest of the
code takes a ``Settings`` value instead of reading ``os.environ`` itself;
that keeps each module testable with explicit settings.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Mapping

#: SendMessageBatch calls in flight per request. Chosen with ``make bench``
#: (12 ms SQS latency, 1000-message requests, PACKING=off): 16 -> 14x the
#: naive Lambda, 32 -> 23x, 64 -> 30x, 100 -> 28x (the GIL, not SQS, limits).
DEFAULT_SEND_CONCURRENCY = 64
#: Seconds we may spend sending, well under API Gateway's 29 s timeout so a
#: 503 reaches flespi before the gateway gives up on us.
DEFAULT_SEND_DEADLINE = 20.0
#: Seconds one POST of the ``http`` sink may take before it counts as failed
#: (and is retried while the consumer Lambda has time left).
DEFAULT_SINK_TIMEOUT = 5.0


class ConfigError(ValueError):
    """A setting is missing or malformed; raised at import so it shows in logs."""


@dataclass(frozen=True)
class Settings:
    queue_name: str
    packing: bool = False
    send_concurrency: int = DEFAULT_SEND_CONCURRENCY
    send_deadline: float = DEFAULT_SEND_DEADLINE
    sink: str = "log"
    sink_url: str | None = None
    sink_headers: Mapping[str, str] = field(default_factory=dict)
    consume_batch_size: int = 100
    consume_batch_window: int = 1
    sink_timeout: float = DEFAULT_SINK_TIMEOUT

    @property
    def fifo(self) -> bool:
        """SQS decides FIFO-ness by the name's suffix; so do we."""
        return self.queue_name.endswith(".fifo")


def _flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("on", "true", "1", "yes"):
        return True
    if raw in ("off", "false", "0", "no"):
        return False
    raise ConfigError(f"{name} must be 'on' or 'off', not {raw!r}")


def _number(
    environ: Mapping[str, str], name: str, default: float, cast: type, minimum: float = 1
) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, not {raw!r}")
    return value


def _headers(environ: Mapping[str, str]) -> dict[str, str]:
    raw = environ.get("SINK_HEADERS", "").strip()
    if not raw:
        return {}
    try:
        headers = json.loads(raw)
    except ValueError:
        raise ConfigError("SINK_HEADERS must be a JSON object") from None
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ConfigError("SINK_HEADERS must be a JSON object of strings")
    return headers


def from_env(environ: Mapping[str, str] = os.environ) -> Settings:
    """Build the settings; fail loudly on anything malformed."""
    queue_name = environ.get("QUEUE_NAME", "").strip()
    if not queue_name:
        raise ConfigError("QUEUE_NAME is required (set it per stage in .chalice/config.json)")
    fifo = queue_name.endswith(".fifo")
    sink = environ.get("SINK", "log").strip() or "log"
    if sink not in ("log", "http"):
        raise ConfigError(f"SINK must be 'log' or 'http', not {sink!r}")
    sink_url = environ.get("SINK_URL", "").strip() or None
    if sink == "http" and not sink_url:
        raise ConfigError("SINK=http needs SINK_URL")
    return Settings(
        queue_name=queue_name,
        packing=_flag(environ, "PACKING", False),
        send_concurrency=int(_number(environ, "SEND_CONCURRENCY", DEFAULT_SEND_CONCURRENCY, int)),
        send_deadline=_number(environ, "SEND_DEADLINE_SECONDS", DEFAULT_SEND_DEADLINE, float, 0.1),
        sink=sink,
        sink_url=sink_url,
        sink_headers=_headers(environ),
        # Lambda allows at most 10 records and no batching window on FIFO.
        consume_batch_size=int(_number(environ, "CONSUME_BATCH_SIZE", 10 if fifo else 100, int)),
        consume_batch_window=int(
            _number(environ, "CONSUME_BATCH_WINDOW_SECONDS", 0 if fifo else 1, int, 0)
        ),
        sink_timeout=_number(environ, "SINK_TIMEOUT_SECONDS", DEFAULT_SINK_TIMEOUT, float, 0.1),
    )
