"""POST /flespi: validate the whole batch, send all of it, then answer.

The answer is flespi's only signal: 200 drops the batch from its buffer,
anything else makes it resend the whole batch. So 200 is given only when
every message is confirmed in SQS, and a rejected request sends nothing.
"""
from __future__ import annotations

import binascii
import functools
import time
from typing import Any


import pybase64
from botocore.exceptions import BotoCoreError, ClientError
from chalice import Response

from . import observe, pack, parse, sqs, timing
from .config import Settings

#: Request types API Gateway must hand over as bytes (Chalice already treats
#: application/octet-stream as binary): gzip bodies and invalid UTF-8 must
#: reach the parser untouched.
BINARY_REQUEST_TYPES = ["application/json", "text/plain"]
#: Our answers are JSON, but labelled with a type that is not a binary
#: request type: Chalice (like API Gateway) would otherwise base64 them and
#: demand a matching Accept header, which flespi does not promise to send.
RESPONSE_TYPE = "application/vnd.flespi-sqs+json"
#: Time kept back from the Lambda deadline to answer and log.
_ANSWER_MARGIN = 1.0


@functools.lru_cache(maxsize=4)
def sender(queue_name: str, concurrency: int) -> sqs.Sender:
    """One SQS connection pool and thread pool per container (and queue)."""
    return sqs.Sender(sqs.SqsTransport(queue_name), concurrency)


def handle(request: Any, context: Any, settings: Settings) -> Response:
    """The route: parse, pack, send, answer, and log one line about it."""
    started = time.monotonic()
    deadline = started + _budget(context, settings)
    try:
        messages = parse.read_request(_body(request), request.headers)
        entries = pack.make_entries(messages, settings.packing, settings.fifo)
    except parse.RequestError as exc:
        return _answer(exc.status, {"error": exc.message}, started, {})
    if not entries:
        return _answer(200, {"accepted": 0, "sqs_messages": 0, "sqs_calls": 0}, started, {})
    try:
        send = sender(settings.queue_name, settings.send_concurrency)
    except (BotoCoreError, ClientError) as exc:
        error = f"SQS queue {settings.queue_name!r} is not reachable: {exc}"
        return _answer(503, {"error": error}, started, {"messages": len(messages)})
    received = len(messages)
    lanes = pack.plan_lanes(entries, settings.send_concurrency)
    # The entries hold everything SQS needs; the parsed messages are freed
    # while the first call is on the wire.
    report = send.send(lanes, deadline, while_waiting=messages.clear)
    counts = {
        "messages": received,
        "sqs_messages": report.sqs_messages,
        "sqs_calls": report.calls,
        "retries": report.retries,
        "billed_requests": report.billed,
        "unsent": report.unsent,
    }
    # The second test is belt and braces: every message is counted either
    # stored or unsent, but a 200 must never rest on that bookkeeping alone.
    if report.unsent or report.messages != received:
        error = (
            f"SQS took {report.messages} of {received} messages before the deadline "
            f"(errors: {report.errors or 'none'}); resend the batch"
        )
        body = {"error": error, "stored": report.messages, "unsent": received - report.messages}
        return _answer(503, body, started, counts, report.errors)
    body = {
        "accepted": report.messages,
        "sqs_messages": report.sqs_messages,
        "sqs_calls": report.calls,
        "retries": report.retries,
    }
    return _answer(200, body, started, counts, report.errors)


def _body(request: Any) -> bytes:
    """The request's bytes, as API Gateway received them.

    API Gateway base64-encodes binary bodies (all of ours); Chalice's
    ``raw_body`` decodes them with binascii, which costs a tenth of a packed
    1000-message request's CPU, and pybase64 about a fiftieth of that.
    """
    event = request.to_original_event()
    body = event.get("body") or ""
    if not event.get("isBase64Encoded"):
        return body.encode() if isinstance(body, str) else body
    try:
        return pybase64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise parse.RequestError(400, "body is not valid base64") from None


def _budget(context: Any, settings: Settings) -> float:
    """Seconds we may spend sending: the setting, cut short by Lambda's clock."""
    lambda_left = timing.remaining_seconds(context) - _ANSWER_MARGIN
    return max(0.0, min(settings.send_deadline, lambda_left))


def _answer(
    status: int,
    body: dict,
    started: float,
    counts: dict[str, int],
    errors: dict[str, int] | None = None,
) -> Response:
    """Log the request's one line, then build the response."""
    counts = {**counts, "duration_ms": round((time.monotonic() - started) * 1000, 1)}
    fields: dict[str, object] = {"status": status}
    if status != 200:
        fields["error"] = body["error"]
    if errors:
        fields["sqs_errors"] = errors
    observe.emit("ingest", counts, fields, units={"duration_ms": "Milliseconds"})
    return Response(body=body, status_code=status, headers={"Content-Type": RESPONSE_TYPE})
