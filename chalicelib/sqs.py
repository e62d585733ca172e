"""Send planned batches to SQS: concurrent, retried, never over-reported.

Why not ``boto3.client("sqs").send_message_batch``: a 1000-message flespi
request needs 100 calls, and botocore spends most of a call's CPU on generic
work (parameter validation, endpoint rules, event hooks, a general signer,
http.client) while the call itself waits on the network. Lambda runs our
threads on one GIL, so that CPU is the ceiling on throughput (``make bench``
shows it). We keep botocore for what must be right - credentials, region,
the endpoint (``AWS_ENDPOINT_URL`` included), the CA bundle and the one
GetQueueUrl call - and make the hot call lean: orjson, a narrow SigV4 signer
(``sigv4``) and a kept-alive HTTP/1.1 pool (``http1``).

Losslessness: a message counts as sent only when SQS lists it under
``Successful``. Failed entries, throttling, 5xx and broken connections are
retried with jittered backoff until the deadline; whatever is left is
reported unsent and the caller answers 503.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import botocore.session
import orjson
from botocore.httpsession import get_cert_path

from . import http1, sigv4, timing
from .pack import Batch, Entry, Lane, billed_requests

# Error codes worth another try: botocore's throttling and transient lists
# (botocore.retries.standard) plus the SQS and KMS spellings of the same.
RETRYABLE_CODES = frozenset(
    {
        "Throttling", "ThrottlingException", "ThrottledException",
        "RequestThrottledException", "TooManyRequestsException",
        "RequestLimitExceeded", "BandwidthLimitExceeded", "LimitExceededException",
        "RequestThrottled", "SlowDown", "PriorRequestNotComplete",
        "RequestTimeout", "RequestTimeoutException", "ServiceUnavailable",
        "InternalError", "InternalFailure", "KmsThrottled", "KMS.ThrottlingException",
        "AWS.SimpleQueueService.RequestThrottled",
    }
)
_FIRST_BACKOFF = 0.02
_MAX_BACKOFF = 1.0
_READ_TIMEOUT = 10.0


def _nothing() -> None:
    """The default ``while_waiting``: no work to overlap."""


@dataclass
class CallOutcome:
    """What one SendMessageBatch call did, by entry position in the batch."""

    succeeded: list[int] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    error: str | None = None


@dataclass
class SendReport:
    """Counts for the response and the log line; ``unsent`` > 0 means 503."""

    messages: int = 0
    sqs_messages: int = 0
    calls: int = 0
    retries: int = 0
    billed: int = 0
    unsent: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, other: "SendReport") -> None:
        """Fold a lane's report into the request's."""
        self.messages += other.messages
        self.sqs_messages += other.sqs_messages
        self.calls += other.calls
        self.retries += other.retries
        self.billed += other.billed
        self.unsent += other.unsent
        for code, count in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + count

    def note_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


class SqsTransport:
    """One queue's SendMessageBatch over a kept-alive, signed HTTP pool."""

    def __init__(self, queue_name: str) -> None:
        session = botocore.session.Session()
        client = session.create_client("sqs")
        # One GetQueueUrl per container: no STS, no account id in config.
        self.queue_url: str = client.get_queue_url(QueueName=queue_name)["QueueUrl"]
        self.fifo = queue_name.endswith(".fifo")
        self._credentials = session.get_credentials()
        self._signer = sigv4.Signer(client.meta.region_name, "sqs")
        self._pool = http1.Pool(client.meta.endpoint_url, get_cert_path(True))
        self._queue_url_json = orjson.dumps(self.queue_url)

    def payload(self, batch: Batch, positions: Sequence[int]) -> bytes:
        """The JSON request for the entries at ``positions``; Ids are positions.

        Built by hand rather than by ``orjson.dumps`` of a dict: each body is
        already compact JSON from orjson (no raw control characters), so only
        backslashes and quotes need escaping to make it a JSON string, and
        decoding a packed 1 MiB body to ``str`` first would cost more.
        """
        parts = []
        for position in positions:
            entry = batch[position]
            escaped = entry.body.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
            item = b'{"Id":"%d","MessageBody":"%s"' % (position, escaped)
            if self.fifo:
                item += b',"MessageGroupId":%s,"MessageDeduplicationId":"%s"' % (
                    orjson.dumps(entry.group), entry.dedup_id.encode()
                )
            parts.append(item + b"}")
        return b'{"QueueUrl":%s,"Entries":[%s]}' % (self._queue_url_json, b",".join(parts))

    def call(
        self,
        batch: Batch,
        positions: Sequence[int],
        timeout: float,
        while_waiting: Callable[[], None] = _nothing,
    ) -> CallOutcome:
        """One SendMessageBatch; sorts each entry into succeeded/retry/failed."""
        body = self.payload(batch, positions)
        headers = self._signer.headers(
            self._credentials.get_frozen_credentials(),
            self._pool.host,
            self._pool.path,
            "AmazonSQS.SendMessageBatch",
            body,
        )
        try:
            response = self._pool.post(headers, body, timeout, while_waiting)
        except http1.HttpError as exc:
            # Reset, refused or timed out: SQS may or may not have the
            # messages, so they are retried (duplicates are allowed, loss not).
            return CallOutcome(retry=list(positions), error=type(exc.__cause__).__name__)
        return _outcome(response.status, response.headers, response.body, positions)


def _outcome(
    status: int, headers: Mapping[str, str], data: bytes, positions: Sequence[int]
) -> CallOutcome:
    """Read a SendMessageBatch answer; anything unreadable is retried."""
    try:
        answer = orjson.loads(data) if data else {}
    except orjson.JSONDecodeError:
        answer = {}
    if status != 200 or not isinstance(answer, dict):
        code = _error_code(headers, answer if isinstance(answer, dict) else {}, status)
        if status >= 500 or status == 429 or code in RETRYABLE_CODES:
            return CallOutcome(retry=list(positions), error=code)
        return CallOutcome(failed=list(positions), error=code)
    outcome = CallOutcome()
    asked = set(positions)
    for item in answer.get("Successful") or ():
        position = int(item["Id"])
        if position in asked:
            outcome.succeeded.append(position)
            asked.discard(position)
    for item in answer.get("Failed") or ():
        position = int(item["Id"])
        if position not in asked:
            continue
        asked.discard(position)
        code = item.get("Code", "Unknown")
        outcome.error = code
        if not item.get("SenderFault") or code in RETRYABLE_CODES:
            outcome.retry.append(position)
        else:
            outcome.failed.append(position)
    # An entry SQS did not mention at all is not known to be stored.
    outcome.retry.extend(sorted(asked))
    return outcome


def _error_code(headers: Mapping[str, str], answer: dict, status: int) -> str:
    """The AWS error code of a failed call, however SQS chose to say it."""
    query_error = headers.get("x-amzn-query-error")
    if query_error:
        return query_error.split(";", 1)[0]
    kind = answer.get("__type") or answer.get("code")
    if kind:
        return str(kind).rsplit("#", 1)[-1]
    return f"HTTP{status}"


class Sender:
    """Runs lanes of batches on a container-wide thread pool, within a deadline."""

    def __init__(self, transport: SqsTransport, concurrency: int) -> None:
        self.transport = transport
        # The calling thread sends a lane too, so the pool holds one fewer:
        # ``concurrency`` calls in flight in all.
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, concurrency - 1), thread_name_prefix="sqs"
        )

    def send(
        self, lanes: Sequence[Lane], deadline: float, while_waiting: Callable[[], None] = _nothing
    ) -> SendReport:
        """Send everything it can before ``deadline`` (a ``time.monotonic`` value).

        The calling thread sends the first lane itself and, once its first
        request is on the wire, runs ``while_waiting``: work the request must
        do anyway (freeing the parsed flespi messages takes about 1 ms per
        1000) then overlaps SQS's answer instead of delaying ours.
        """
        others = [self._pool.submit(self._send_lane, lane, deadline) for lane in lanes[1:]]
        report = self._send_lane(lanes[0], deadline, while_waiting)
        for other in others:
            report.add(other.result())
        return report

    def _send_lane(
        self, lane: Lane, deadline: float, while_waiting: Callable[[], None] = _nothing
    ) -> SendReport:
        """Batches one after the other; after one is left incomplete, the rest
        of the lane is not sent, so a device's FIFO order never gets a gap."""
        report = SendReport()
        for number, batch in enumerate(lane):
            unsent = self._send_batch(batch, deadline, report, while_waiting)
            while_waiting = _nothing
            if unsent:
                report.unsent += sum(entry.count for entry in unsent)
                report.unsent += sum(e.count for later in lane[number + 1 :] for e in later)
                break
        return report

    def _send_batch(
        self,
        batch: Batch,
        deadline: float,
        report: SendReport,
        while_waiting: Callable[[], None] = _nothing,
    ) -> list[Entry]:
        """Retry one batch's failing entries until done or out of time.

        Returns the entries that are not known to be in SQS.
        """
        pending = list(range(len(batch)))
        attempt = 0
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if attempt:
                report.retries += 1
            outcome = self.transport.call(
                batch, pending, min(remaining, _READ_TIMEOUT), while_waiting
            )
            while_waiting = _nothing
            report.calls += 1
            report.billed += billed_requests([batch[p] for p in pending])
            for position in outcome.succeeded:
                report.sqs_messages += 1
                report.messages += batch[position].count
            if outcome.error:
                report.note_error(outcome.error)
            if outcome.failed:
                return [batch[p] for p in outcome.failed + outcome.retry]
            pending = outcome.retry
            if pending and not timing.wait_before_retry(
                attempt, deadline, _FIRST_BACKOFF, _MAX_BACKOFF
            ):
                break
            attempt += 1
        return [batch[p] for p in pending]

