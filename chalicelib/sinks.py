"""Where the consumer puts flespi messages: the ``log`` and ``http`` sinks.

A sink is anything with ``deliver(messages, deadline)`` (the ``Sink``
protocol below). The consumer calls it once per Lambda invocation with the
messages of every record it could decode, in record order, and reads the
outcome from whether it raises: returning means every message is delivered,
raising anything means none of them counts as delivered and all the records
they came from are reported failed, so SQS redelivers them. That is
at-least-once: a sink that delivered part of a batch and then raised will see
those messages again, so receivers should tolerate duplicates.

One call per invocation is the cheapest for a remote sink (one POST instead of
one per record); the price is that one failed call fails all its records,
which the contract allows ("any non-2xx or timeout fails those records").

Sinks are built once per container (``for_settings`` caches them), so the
``http`` sink's connection pool survives between invocations.
"""
from __future__ import annotations

import functools
import sys
import time
from typing import Mapping, Protocol, Sequence

import orjson
import urllib3

from chalicelib import timing
from chalicelib.config import Settings

#: Statuses worth another try: the receiver is overloaded or briefly broken.
#: Other non-2xx answers (400, 401, 404, 3xx, ...) will not change on retry.
RETRYABLE_STATUSES = frozenset({429, *range(500, 600)})
#: Attempts per delivery, fewer when the Lambda deadline comes first.
DEFAULT_MAX_ATTEMPTS = 4
#: Full-jitter exponential backoff: sleep uniform(0, min(cap, base * 2**n)).
BACKOFF_BASE = 0.1
BACKOFF_CAP = 2.0


class SinkError(Exception):
    """The messages were not (all) delivered; their records must be retried."""


class Sink(Protocol):
    """What the consumer needs from an output.

    ``deliver`` gets the decoded flespi messages of one invocation and a
    ``deadline`` on the ``time.monotonic()`` clock (``math.inf`` when there is
    no Lambda context) by which it must return, so the function can still
    report its partial failures before Lambda kills it. Return normally only
    when every message is delivered; raise (preferably ``SinkError``) when not.
    """

    def deliver(self, messages: Sequence[dict], deadline: float) -> None: ...


class LogSink:
    """One compact JSON line per message on stdout, which Lambda ships to CloudWatch Logs.

    The whole batch is one ``write`` so lines of one invocation stay together
    and the cost per message is a single ``orjson.dumps``. Messages are
    re-serialised rather than echoing record bodies, so each line is compact
    and holds exactly one message even for packed records.
    """

    def deliver(self, messages: Sequence[dict], deadline: float) -> None:
        if not messages:
            return
        lines = b"\n".join(map(orjson.dumps, messages)) + b"\n"
        # Looked up per call, not bound at build time: tests and the local
        # runner swap sys.stdout.
        sys.stdout.write(lines.decode())
        sys.stdout.flush()


class HttpSink:
    """POST all messages as one JSON array; retry transient failures until the deadline.

    Connection errors, timeouts, 429 and 5xx are retried with full-jitter
    exponential backoff, never past the deadline; any other non-2xx fails at
    once. urllib3 comes with botocore in every Lambda Python runtime, so this
    needs no dependency of its own.
    """

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self.url = url
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.timeout = timeout
        self.max_attempts = max_attempts
        # retries=False: the retry loop below owns retrying, bounded by the
        # deadline; it also stops redirects from being followed (a 3xx fails).
        self.pool = urllib3.PoolManager(maxsize=1, retries=False)

    def deliver(self, messages: Sequence[dict], deadline: float) -> None:
        if not messages:
            return
        body = orjson.dumps(messages)
        problem, tries = "no time left to try", 0
        for attempt in range(self.max_attempts):
            if attempt and not timing.wait_before_retry(
                attempt, deadline, BACKOFF_BASE, BACKOFF_CAP
            ):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            problem, tries = self._post(body, min(self.timeout, remaining)), tries + 1
            if problem is None:
                return
        raise SinkError(f"POST {self.url} failed after {tries} attempt(s): {problem}")

    def _post(self, body: bytes, timeout: float) -> str | None:
        """One attempt: ``None`` on 2xx, else why it failed; raises if retrying is pointless."""
        try:
            response = self.pool.request(
                "POST", self.url, body=body, headers=self.headers, timeout=timeout
            )
        except urllib3.exceptions.HTTPError as exc:  # connect/read errors and timeouts
            return f"{type(exc).__name__}: {exc}"
        if 200 <= response.status < 300:
            return None
        problem = f"HTTP {response.status}"
        if response.status not in RETRYABLE_STATUSES:
            raise SinkError(f"POST {self.url} answered {problem}")
        return problem


def for_settings(settings: Settings) -> Sink:
    """The container's sink for these settings, built on first use and then reused."""
    return _cached(
        settings.sink,
        settings.sink_url,
        tuple(sorted(settings.sink_headers.items())),
        settings.sink_timeout,
    )


@functools.cache
def _cached(
    kind: str, url: str | None, headers: tuple[tuple[str, str], ...], timeout: float
) -> Sink:
    """Keyed on plain values because ``Settings`` holds a dict and is not hashable."""
    if kind == "log":
        return LogSink()
    if kind == "http" and url:
        return HttpSink(url, dict(headers), timeout)
    raise ValueError(f"no sink {kind!r} (with SINK_URL {url!r})")

