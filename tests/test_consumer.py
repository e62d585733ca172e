"""The SQS consumer against Lambda-shaped events, a real HTTP receiver and real stdout.

Nothing of ours is replaced: events look like what Lambda hands the function
(distinct message ids, attributes, receive counts), the ``http`` sink talks to
an ``http.server`` on a loopback port that can accept, fail or stall, and the
``log`` sink writes to the captured stdout.
"""
from __future__ import annotations

import base64
import hashlib
import importlib
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, Sequence

import orjson
import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from chalicelib import config, consumer, sinks
from tests.conftest import free_port
from tools.sqs_trigger import lambda_record

REGION = "us-east-1"
ACCOUNT = "123456789012"
MALFORMED = '{"ident": "352625333222111", "timestamp": 1699'  # cut off mid-message


# --------------------------------------------------------------------------- events


def sqs_record(body: str, queue: str = "flespi-test", receive_count: int = 1) -> dict:
    """One record as Lambda's SQS event source delivers it, with its own messageId."""
    now_ms = str(int(time.time() * 1000))
    attributes = {
        "ApproximateReceiveCount": str(receive_count),
        "SentTimestamp": now_ms,
        "SenderId": "AROAEXAMPLE:flespi-sqs-dev",
        "ApproximateFirstReceiveTimestamp": now_ms,
    }
    if queue.endswith(".fifo"):
        attributes.update(
            MessageGroupId="352625333222111",
            MessageDeduplicationId=hashlib.sha256(body.encode()).hexdigest(),
            SequenceNumber=str(18_000_000_000_000_000_000 + uuid.uuid4().int % 10**9),
        )
    return {
        "messageId": str(uuid.uuid4()),
        "receiptHandle": "AQEB" + base64.b64encode(os.urandom(96)).decode(),
        "body": body,
        "attributes": attributes,
        "messageAttributes": {},
        "md5OfBody": hashlib.md5(body.encode()).hexdigest(),
        "eventSource": "aws:sqs",
        "eventSourceARN": f"arn:aws:sqs:{REGION}:{ACCOUNT}:{queue}",
        "awsRegion": REGION,
    }


def sqs_event(bodies: Sequence[str], queue: str = "flespi-test") -> dict:
    return {"Records": [sqs_record(body, queue) for body in bodies]}


def ids(event: dict, *positions: int) -> list[str]:
    return [event["Records"][p]["messageId"] for p in positions]


def failed(response: dict) -> list[str]:
    assert set(response) == {"batchItemFailures"}
    return [item["itemIdentifier"] for item in response["batchItemFailures"]]


def compact(value: object) -> str:
    return orjson.dumps(value).decode()


def metric_lines(stderr: str) -> list[dict]:
    """The EMF lines among captured stderr (a moto server thread may log there too)."""
    return [orjson.loads(line) for line in stderr.splitlines() if line.startswith('{"_aws"')]


@dataclass
class LambdaContext:
    """The one method of Lambda's context object the consumer uses."""

    remaining_ms: int

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


@pytest.fixture()
def judged(samples) -> tuple[dict, list[dict]]:
    """The judged batch: [object, packed array of 3, malformed], and its 4 messages."""
    messages = samples[:4]
    event = sqs_event([compact(messages[0]), compact(messages[1:4]), MALFORMED])
    return event, messages


# --------------------------------------------------------------------------- receiver


@dataclass
class Receiver:
    """A real HTTP endpoint on loopback; ``statuses`` are answered in turn, then ``status``."""

    url: str = ""
    status: int = 200
    statuses: list[int] = field(default_factory=list)
    delay: float = 0.0
    posts: list[list[dict]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    clients: list[tuple[str, int]] = field(default_factory=list)

    def next_status(self) -> int:
        return self.statuses.pop(0) if self.statuses else self.status


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is visible

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.posts.append(orjson.loads(body))
            state.headers.append(dict(self.headers))
            state.clients.append(self.client_address)
            time.sleep(state.delay)
            self.send_response(state.next_status())
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.handle_error = lambda *args: None  # a client that timed out and left
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/ingest"
    yield state
    server.shutdown()
    server.server_close()


def http_settings(url: str, queue: str = "flespi-test", timeout: float = 2.0) -> config.Settings:
    return config.Settings(
        queue_name=queue,
        sink="http",
        sink_url=url,
        sink_headers={"Authorization": "Bearer sink-token"},
        sink_timeout=timeout,
    )


LOG = config.Settings(queue_name="flespi-test")


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    "body, count",
    [('{"ident":"1"}', 1), (' \n\t[{"ident":"1"},{"ident":"2"}]', 2), ("[]", 0)],
)
def test_decode_takes_an_object_or_an_array_of_objects(body: str, count: int) -> None:
    assert len(consumer.decode(body)) == count


@pytest.mark.parametrize(
    "body",
    [MALFORMED, "", "   ", "null", "3", '"text"', "true", '[{"a":1}, 2]', "[[{}]]",
     '{"a": NaN}', "\ud800", '{"a":1} {"b":2}', None],
)
def test_decode_rejects_everything_else(body: object) -> None:
    with pytest.raises(consumer.MalformedRecord):
        consumer.decode(body)


# --------------------------------------------------------------------------- the judged cases


def test_http_sink_receives_all_messages_and_only_the_malformed_record_fails(
    judged, receiver: Receiver
) -> None:
    event, messages = judged
    response = consumer.handle(event, LambdaContext(30_000), http_settings(receiver.url))
    assert failed(response) == ids(event, 2)
    assert receiver.posts == [messages]  # one POST, all 4, in record order
    assert receiver.headers[0]["Authorization"] == "Bearer sink-token"
    assert receiver.headers[0]["Content-Type"] == "application/json"


def test_http_sink_answering_500_fails_every_record(judged, receiver: Receiver) -> None:
    event, messages = judged
    receiver.status = 500
    response = consumer.handle(event, None, http_settings(receiver.url))
    assert failed(response) == ids(event, 0, 1, 2)
    assert receiver.posts == [messages] * sinks.DEFAULT_MAX_ATTEMPTS  # retried, then given up


def test_log_sink_prints_exactly_one_compact_line_per_message(judged, capsys) -> None:
    event, messages = judged
    response = consumer.handle(event, None, LOG)
    out, err = capsys.readouterr()
    assert failed(response) == ids(event, 2)
    assert out.splitlines() == [compact(m) for m in messages]
    assert out.endswith("\n") and out.count("\n") == 4
    [metrics] = metric_lines(err)  # exactly one structured line, on stderr
    assert (metrics["records"], metrics["messages"], metrics["failed_records"]) == (3, 4, 1)
    assert metrics["operation"] == "consume" and metrics["duration_ms"] >= 0
    assert event["Records"][2]["messageId"] in metrics["errors"][0]


def test_chalice_handler_uses_the_log_sink_by_default(judged, capsys, monkeypatch) -> None:
    """The deployed entry point: Chalice's SQS handler object called as Lambda calls it."""
    monkeypatch.delenv("SINK", raising=False)
    app = importlib.import_module("app")
    event, messages = judged
    response = app.consume(event, LambdaContext(60_000))
    assert failed(response) == ids(event, 2)
    assert capsys.readouterr().out.splitlines() == [compact(m) for m in messages]


# --------------------------------------------------------------------------- http sink


def test_http_sink_retries_transient_failures(judged, receiver: Receiver) -> None:
    event, messages = judged
    receiver.statuses = [503, 429]
    response = consumer.handle(event, LambdaContext(30_000), http_settings(receiver.url))
    assert failed(response) == ids(event, 2)
    assert receiver.posts == [messages] * 3


def test_http_sink_does_not_retry_a_client_error(judged, receiver: Receiver) -> None:
    event, _ = judged
    receiver.status = 400
    response = consumer.handle(event, LambdaContext(30_000), http_settings(receiver.url))
    assert failed(response) == ids(event, 0, 1, 2)
    assert len(receiver.posts) == 1


def test_http_sink_timeout_fails_the_records_within_the_lambda_deadline(
    judged, receiver: Receiver
) -> None:
    event, _ = judged
    receiver.delay = 1.5
    started = time.monotonic()
    response = consumer.handle(event, LambdaContext(1_200), http_settings(receiver.url, timeout=0.2))
    elapsed = time.monotonic() - started
    assert failed(response) == ids(event, 0, 1, 2)
    assert 0.2 <= elapsed < 1.2 - consumer.DEADLINE_MARGIN + 0.1
    assert 1 <= len(receiver.posts) <= sinks.DEFAULT_MAX_ATTEMPTS


def test_http_sink_without_time_left_does_not_post(judged, receiver: Receiver) -> None:
    event, _ = judged
    response = consumer.handle(event, LambdaContext(100), http_settings(receiver.url))
    assert failed(response) == ids(event, 0, 1, 2)
    assert receiver.posts == []


def test_unreachable_receiver_fails_the_records(judged) -> None:
    event, _ = judged
    url = f"http://127.0.0.1:{free_port()}/"
    response = consumer.handle(event, LambdaContext(3_000), http_settings(url, timeout=0.5))
    assert failed(response) == ids(event, 0, 1, 2)


def test_http_sink_is_built_once_and_reuses_its_connection(samples, receiver: Receiver) -> None:
    settings = http_settings(receiver.url)
    for _ in range(3):
        assert failed(consumer.handle(sqs_event([compact(samples[0])]), None, settings)) == []
    assert sinks.for_settings(settings) is sinks.for_settings(http_settings(receiver.url))
    assert len(set(receiver.clients)) == 1


def test_records_without_messages_do_not_call_the_sink(receiver: Receiver) -> None:
    event = sqs_event(["[]", MALFORMED])
    response = consumer.handle(event, None, http_settings(receiver.url))
    assert failed(response) == ids(event, 1)
    assert receiver.posts == []


# --------------------------------------------------------------------------- FIFO


def test_fifo_fails_every_record_after_the_first_failure_unprocessed(samples, capsys) -> None:
    queue = "flespi-test.fifo"
    bodies = [compact(samples[0]), MALFORMED, compact(samples[1]), compact(samples[2:4])]
    event = sqs_event(bodies, queue)
    response = consumer.handle(event, None, config.Settings(queue_name=queue))
    assert failed(response) == ids(event, 1, 2, 3)
    assert capsys.readouterr().out.splitlines() == [compact(samples[0])]


def test_standard_queue_processes_records_after_a_failure(samples, capsys) -> None:
    bodies = [compact(samples[0]), MALFORMED, compact(samples[1]), compact(samples[2:4])]
    event = sqs_event(bodies)
    assert failed(consumer.handle(event, None, LOG)) == ids(event, 1)
    assert capsys.readouterr().out.splitlines() == [compact(m) for m in samples[:4]]


def test_fifo_sink_failure_fails_the_whole_batch_in_order(samples, receiver: Receiver) -> None:
    queue = "flespi-test.fifo"
    receiver.status = 502
    event = sqs_event([compact(samples[0]), compact(samples[1:3]), MALFORMED], queue)
    response = consumer.handle(event, LambdaContext(1_500), http_settings(receiver.url, queue))
    assert failed(response) == ids(event, 0, 1, 2)


# --------------------------------------------------------------------------- contract as a property


class ListSink:
    """A user-written sink: keeps what it is given, or refuses all of it."""

    def __init__(self, broken: bool) -> None:
        self.broken = broken
        self.delivered: list[dict] = []

    def deliver(self, messages: Sequence[dict], deadline: float) -> None:
        if self.broken:
            raise RuntimeError("downstream is down")
        self.delivered.extend(messages)


def not_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return True
    return False


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
flespi_like = st.dictionaries(st.text(min_size=1), json_values, max_size=5)
#: (record body, the messages it holds, or None when the record must fail)
records = st.one_of(
    flespi_like.map(lambda m: (compact(m), [m])),
    st.lists(flespi_like, max_size=4).map(lambda ms: (compact(ms), ms)),
    json_values.filter(lambda v: not isinstance(v, (dict, list))).map(lambda v: (compact(v), None)),
    st.lists(json_values, min_size=1)
    .filter(lambda v: not all(isinstance(i, dict) for i in v))
    .map(lambda v: (compact(v), None)),
    st.text().filter(not_json).map(lambda t: (t, None)),
)


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records, max_size=8), st.booleans(), st.booleans())
def test_exactly_the_undecodable_records_fail(
    batch: list[tuple[str, list[dict] | None]], fifo: bool, broken: bool
) -> None:
    """Without a sink failure only bad records (and on FIFO all after them) fail; with one, all."""
    queue = "flespi-test.fifo" if fifo else "flespi-test"
    event = sqs_event([body for body, _ in batch], queue)
    bad = [i for i, (_, messages) in enumerate(batch) if messages is None]
    cut = bad[0] if fifo and bad else len(batch)
    expected_failed = list(range(cut, len(batch))) if fifo and bad else bad
    decoded = [m for _, messages in batch[:cut] if messages is not None for m in messages]
    sink = ListSink(broken)
    outcome = consumer.process(event["Records"], sink, fifo)
    assert outcome.failed == ids(event, *(range(len(batch)) if broken else expected_failed))
    assert sink.delivered == ([] if broken else decoded)
    assert outcome.messages == len(decoded)


# --------------------------------------------------------------------------- with a real queue


def lambda_records(sqs, queue_url: str, queue_arn: str) -> list[dict]:
    """Receive like Lambda's SQS poller does and reshape into event records."""
    answer = sqs.receive_message(
        QueueUrl=queue_url, MaxNumberOfMessages=10, AttributeNames=["All"], WaitTimeSeconds=0
    )
    return [lambda_record(m, queue_arn, REGION) for m in answer.get("Messages", [])]


def test_only_failed_records_come_back_from_the_queue(sqs, judged, capsys) -> None:
    """The loop Lambda runs: receive, consume, delete all but batchItemFailures, receive again."""
    queue_url = sqs.create_queue(
        QueueName=f"consumer-{uuid.uuid4().hex[:8]}", Attributes={"VisibilityTimeout": "0"}
    )["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    try:
        for record in judged[0]["Records"]:
            sqs.send_message(QueueUrl=queue_url, MessageBody=record["body"])
        records = lambda_records(sqs, queue_url, queue_arn)
        assert len(records) == 3
        retry = set(failed(consumer.handle({"Records": records}, None, LOG)))
        for record in records:
            if record["messageId"] not in retry:
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=record["receiptHandle"])
        assert len(capsys.readouterr().out.splitlines()) == 4

        again = lambda_records(sqs, queue_url, queue_arn)
        assert [r["body"] for r in again] == [MALFORMED]
        assert again[0]["attributes"]["ApproximateReceiveCount"] == "2"
        consumer.handle({"Records": again}, None, LOG)
        [metrics] = metric_lines(capsys.readouterr().err)
        assert (metrics["failed_records"], metrics["redelivered_records"]) == (1, 1)
    finally:
        sqs.delete_queue(QueueUrl=queue_url)
