"""A local stand-in for Lambda's SQS event source mapping.

``chalice local`` serves routes only; it never runs ``@app.on_sqs_message``
handlers. This module does what the Lambda poller does for any Chalice app:
it long-polls each handler's queue, hands the handler an event shaped exactly
like Lambda's SQS event, deletes the records that succeeded and leaves the
others to come back after the visibility timeout, so a queue's redrive policy
moves them to its dead-letter queue just as in AWS.

Lambda semantics kept (with ``ReportBatchItemFailures`` on, as our deployment
sets it):

* ``batch_size`` and ``maximum_batching_window_in_seconds`` decide when a
  batch is complete;
* a returned ``batchItemFailures`` list leaves exactly those records on the
  queue; an entry naming no record of the batch fails the whole batch;
* an exception leaves the whole batch on the queue.

One poller per handler, one batch in flight at a time: ``maximum_concurrency``
has nothing to limit locally.
"""
from __future__ import annotations

import base64
import math
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from chalice.app import Chalice, SQSEventConfig
from chalice.config import Config
from chalice.local import LambdaContext

LOG = logging.getLogger("sqs_trigger")

#: What Chalice deploys when a function has no ``lambda_timeout`` /
#: ``lambda_memory_size`` of its own.
DEFAULT_TIMEOUT_SECONDS = 60
DEFAULT_MEMORY_MB = 128
#: SQS returns at most 10 messages per ReceiveMessage and long-polls 20 s.
RECEIVE_MAX = 10
LONG_POLL_MAX_SECONDS = 20

Handler = Callable[[dict, Any], Any]


@dataclass(frozen=True)
class SqsSource:
    """One ``on_sqs_message`` handler and the Lambda settings it runs with."""

    name: str
    queue_name: str
    queue_owner: str | None
    batch_size: int
    batching_window: float
    handler: Handler
    function_name: str
    timeout_seconds: int
    memory_mb: int


def _queue_of(event_source: SQSEventConfig) -> tuple[str, str | None]:
    """The queue's name and owner account; the decorator gives a name or an ARN."""
    if event_source.queue:
        return event_source.queue, None
    *_, account, name = str(event_source.queue_arn).split(":")
    return name, account


def discover(app: Chalice, config: Config | None = None, stage: str = "dev") -> list[SqsSource]:
    """Every ``on_sqs_message`` handler of ``app``.

    Chalice records each decorator as an ``SQSEventConfig`` in
    ``app.event_sources`` and the callable it deploys in ``app.handler_map``;
    ``config`` (the project's ``.chalice/config.json``) supplies the
    function's timeout and memory as ``chalice deploy`` would.
    """
    sources = []
    for event_source in app.event_sources:
        if not isinstance(event_source, SQSEventConfig):
            continue
        scoped = config.scope(stage, event_source.name) if config else None
        queue_name, owner = _queue_of(event_source)
        sources.append(
            SqsSource(
                name=event_source.name,
                queue_name=queue_name,
                queue_owner=owner,
                batch_size=event_source.batch_size,
                batching_window=event_source.maximum_batching_window_in_seconds,
                handler=app.handler_map[event_source.name],
                function_name=f"{app.app_name}-{stage}-{event_source.name}",
                timeout_seconds=(scoped and scoped.lambda_timeout) or DEFAULT_TIMEOUT_SECONDS,
                memory_mb=(scoped and scoped.lambda_memory_size) or DEFAULT_MEMORY_MB,
            )
        )
    return sources


def _message_attribute(value: Mapping[str, Any]) -> dict:
    """SQS API attribute -> Lambda's spelling (camelCase, binary as base64)."""
    converted: dict[str, Any] = {
        "stringListValues": [],
        "binaryListValues": [],
        "dataType": value["DataType"],
    }
    if "StringValue" in value:
        converted["stringValue"] = value["StringValue"]
    if "BinaryValue" in value:
        converted["binaryValue"] = base64.b64encode(value["BinaryValue"]).decode("ascii")
    return converted


def lambda_record(message: Mapping[str, Any], queue_arn: str, region: str) -> dict:
    """One ReceiveMessage entry as a record of Lambda's SQS event."""
    record = {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": dict(message.get("Attributes", {})),
        "messageAttributes": {
            name: _message_attribute(value)
            for name, value in message.get("MessageAttributes", {}).items()
        },
        "md5OfBody": message["MD5OfBody"],
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": region,
    }
    if "MD5OfMessageAttributes" in message:
        record["md5OfMessageAttributes"] = message["MD5OfMessageAttributes"]
    return record


def failed_ids(result: Any, records: list[dict]) -> set[str]:
    """The messageIds to leave on the queue, read the way Lambda reads them.

    No ``batchItemFailures`` means all succeeded; an identifier that is empty
    or names no record of this batch makes Lambda fail the whole batch.
    """
    batch_ids = {record["messageId"] for record in records}
    if not isinstance(result, Mapping) or not result.get("batchItemFailures"):
        return set()
    failures = {
        item.get("itemIdentifier") if isinstance(item, Mapping) else None
        for item in result["batchItemFailures"]
    }
    if not failures <= batch_ids:
        LOG.warning("batchItemFailures names unknown records %s: whole batch fails",
                    failures - batch_ids)
        return batch_ids
    return failures


class SqsPoller:
    """Runs one ``SqsSource`` against its queue, one batch at a time."""

    def __init__(self, source: SqsSource, sqs: Any, wait_seconds: int = LONG_POLL_MAX_SECONDS):
        """``wait_seconds`` bounds one long poll, and so how fast ``stop`` takes effect."""
        self.source = source
        self._sqs = sqs
        self._wait_seconds = max(1, min(wait_seconds, LONG_POLL_MAX_SECONDS))
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._queue_url = ""
        self._queue_arn = ""

    def resolve(self) -> None:
        """Look the queue up once: its URL to poll, its ARN for the events."""
        kwargs = {"QueueName": self.source.queue_name}
        if self.source.queue_owner:
            kwargs["QueueOwnerAWSAccountId"] = self.source.queue_owner
        self._queue_url = self._sqs.get_queue_url(**kwargs)["QueueUrl"]
        self._queue_arn = self._sqs.get_queue_attributes(
            QueueUrl=self._queue_url, AttributeNames=["QueueArn"]
        )["Attributes"]["QueueArn"]

    def _receive(self, count: int, wait: int) -> list[dict]:
        response = self._sqs.receive_message(
            QueueUrl=self._queue_url,
            MaxNumberOfMessages=min(count, RECEIVE_MAX),
            WaitTimeSeconds=wait,
            MessageSystemAttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        return response.get("Messages", [])

    def collect(self) -> list[dict]:
        """Gather one batch the way Lambda does.

        Wait for the first message, then keep receiving until ``batch_size``
        is reached or the batching window since that first message is over.
        """
        messages = self._receive(self.source.batch_size, self._wait_seconds)
        window_ends = time.monotonic() + self.source.batching_window
        while (
            messages
            and len(messages) < self.source.batch_size
            and not self._stopping.is_set()
        ):
            left = window_ends - time.monotonic()
            if left <= 0:
                break
            messages += self._receive(
                self.source.batch_size - len(messages), min(math.ceil(left), self._wait_seconds)
            )
        return messages

    def process(self, messages: list[dict]) -> set[str]:
        """Invoke the handler on ``messages``; delete the successes; return the failures."""
        region = self._sqs.meta.region_name
        records = [lambda_record(m, self._queue_arn, region) for m in messages]
        context = LambdaContext(
            function_name=self.source.function_name,
            memory_size=self.source.memory_mb,
            max_runtime_ms=self.source.timeout_seconds * 1000,
        )
        started = time.perf_counter()
        try:
            result = self.source.handler({"Records": records}, context)
        except Exception:
            LOG.exception("%s raised: all %d records stay on the queue",
                          self.source.name, len(records))
            failures = {record["messageId"] for record in records}
        else:
            failures = failed_ids(result, records)
        self._delete(r for r in records if r["messageId"] not in failures)
        LOG.info("%s: %d records, %d failed, %.0f ms", self.source.name, len(records),
                 len(failures), (time.perf_counter() - started) * 1000)
        return failures

    def _delete(self, records: Iterable[dict]) -> None:
        entries = [
            {"Id": str(i), "ReceiptHandle": r["receiptHandle"]} for i, r in enumerate(records)
        ]
        for start in range(0, len(entries), RECEIVE_MAX):
            response = self._sqs.delete_message_batch(
                QueueUrl=self._queue_url, Entries=entries[start:start + RECEIVE_MAX]
            )
            for failure in response.get("Failed", []):
                LOG.warning("%s: delete failed, the record will come back: %s",
                            self.source.name, failure)

    def poll_once(self) -> set[str] | None:
        """One receive-invoke-delete cycle; ``None`` when the queue had nothing."""
        messages = self.collect()
        return self.process(messages) if messages else None

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.poll_once()
            except Exception:
                if self._stopping.is_set():
                    break
                LOG.exception("%s: polling %s failed; retrying in 1 s",
                              self.source.name, self.source.queue_name)
                self._stopping.wait(1)

    def start(self) -> None:
        """Resolve the queue (so a missing one fails now, loudly) and poll in a thread."""
        self.resolve()
        self._thread = threading.Thread(
            target=self._run, name=f"sqs-{self.source.name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the batch in hand, then end; waits at most ``timeout`` seconds."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
