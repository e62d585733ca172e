"""The SQS-triggered consumer: decode every record, hand the messages to a sink,
report exactly the records that failed.

The return value is Lambda's partial batch response,
``{"batchItemFailures": [{"itemIdentifier": messageId}, ...]}``: SQS deletes
every other record of the batch and redelivers only these (and after
``maxReceiveCount`` moves them to the dead-letter queue). Lambda honours it only
when the event source mapping has ``ReportBatchItemFailures``; without it the
answer is ignored and a batch counts as failed only if the function raises.
So this module never raises for a bad record or a failed sink, only for a
malformed event, which is a bug worth a whole-batch retry.

A record body is one flespi message (a JSON object) or a packed JSON array of
them, as ``ingest`` writes them. Anything else fails its own record only.
On a FIFO queue, once a record fails, every later record of the batch is
reported failed without being processed, so no message overtakes an earlier
one of its device (the rule of Powertools' ``SqsFifoPartialProcessor``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import orjson

from chalicelib import observe, sinks, timing
from chalicelib.config import Settings

#: Time kept back from the Lambda's remaining time so the function can still
#: return its partial failures after the sink gave up.
DEADLINE_MARGIN = 0.5


class MalformedRecord(ValueError):
    """A record body that is neither a JSON object nor a JSON array of objects."""


@dataclass
class Outcome:
    """What one batch came to: counts for the log line, failed ids for SQS."""

    records: int = 0
    messages: int = 0
    redelivered: int = 0
    failed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def response(self) -> dict:
        """Lambda's partial batch response, and nothing else."""
        return {"batchItemFailures": [{"itemIdentifier": mid} for mid in self.failed]}


def decode(body: Any) -> list[dict]:
    """The flespi messages in one record body; raises ``MalformedRecord``.

    Only the top-level shape is checked: the consumer forwards messages, it
    does not second-guess what ingest already validated. An empty array is
    zero messages, not an error: nothing in it can be lost.
    """
    if not isinstance(body, str):
        raise MalformedRecord(f"body is {type(body).__name__}, not a string")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedRecord(f"not JSON: {exc}") from None
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise MalformedRecord(f"item {index} is {type(item).__name__}, not an object")
        return value
    raise MalformedRecord(f"body is a JSON {type(value).__name__}, not an object or array")


def process(
    records: Sequence[dict], sink: sinks.Sink, fifo: bool, deadline: float = math.inf
) -> Outcome:
    """Decode ``records`` in order, deliver their messages in one sink call, collect failures.

    Decoding first and delivering once keeps the sink interface to a single
    call per invocation; a failed delivery fails every record it carried.
    With ``fifo``, decoding stops at the first bad record, so the records after
    it never reach the sink and are failed with it.
    """
    outcome = Outcome(records=len(records), redelivered=sum(map(_redelivered, records)))
    failed: list[int] = []  # positions in ``records``
    carried: list[int] = []  # positions whose messages go to the sink
    messages: list[dict] = []
    for position, record in enumerate(records):
        try:
            batch = decode(record.get("body"))
        except MalformedRecord as exc:
            outcome.errors.append(f"{record['messageId']}: {exc}")
            if fifo:
                failed.extend(range(position, len(records)))
                break
            failed.append(position)
        else:
            carried.append(position)
            messages.extend(batch)
    outcome.messages = len(messages)
    try:
        sink.deliver(messages, deadline)
    except Exception as exc:  # any sink failure is a failure of its records, not of the batch
        outcome.errors.append(f"sink: {type(exc).__name__}: {exc}")
        failed.extend(carried)
    outcome.failed = [records[position]["messageId"] for position in sorted(failed)]
    return outcome


def _redelivered(record: dict) -> bool:
    """Whether SQS delivered this record before (a retry after a failure or timeout)."""
    return int(record.get("attributes", {}).get("ApproximateReceiveCount", 1)) > 1


def deadline_of(context: Any) -> float:
    """The ``time.monotonic()`` instant the sink must be done by.

    Unbounded without a Lambda context (tests, a local runner that passes
    ``None``); the sink's own attempt limit still ends its retries there.
    """
    return time.monotonic() + timing.remaining_seconds(context) - DEADLINE_MARGIN


def handle(
    event: dict, context: Any, settings: Settings, sink: sinks.Sink | None = None
) -> dict:
    """Consume one SQS batch; log one metrics line; return the partial batch response.

    ``sink`` defaults to the container's sink for ``settings``; pass your own
    object with a ``deliver`` method to send the messages elsewhere.
    """
    started = time.perf_counter()
    if sink is None:
        sink = sinks.for_settings(settings)
    outcome = process(event["Records"], sink, settings.fifo, deadline_of(context))
    observe.emit(
        "consume",
        {
            "records": outcome.records,
            "messages": outcome.messages,
            "failed_records": len(outcome.failed),
            "redelivered_records": outcome.redelivered,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        },
        # The first few reasons are enough to diagnose; the rest repeat them.
        {"sink": type(sink).__name__, "fifo": settings.fifo, "errors": outcome.errors[:10]},
        units={"duration_ms": "Milliseconds"},
    )
    return outcome.response()
