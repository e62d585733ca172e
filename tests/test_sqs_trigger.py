"""The local SQS trigger against a real moto SQS, with small Chalice apps of our own."""
from __future__ import annotations

import base64
import hashlib
import uuid

import pytest
from chalice import Chalice
from chalice.config import Config

from tools.sqs_trigger import SqsPoller, discover, failed_ids


def new_queue(sqs, visibility: int = 1) -> tuple[str, str]:
    """A fresh queue per test (moto slows down as queues fill); returns name and URL."""
    name = f"trigger-{uuid.uuid4().hex[:12]}"
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": str(visibility)})
    return name, url["QueueUrl"]


def poller_for(app: Chalice, sqs, name: str) -> SqsPoller:
    """A resolved poller for the app's handler ``name``, long-polling 2 s at most."""
    source = next(s for s in discover(app) if s.name == name)
    poller = SqsPoller(source, sqs, wait_seconds=2)
    poller.resolve()
    return poller


def recording_app(queue: str, batch_size: int = 10, window: int = 0, fail_body: str = ""):
    """An app whose handler records each event and fails records whose body is ``fail_body``."""
    app = Chalice(app_name="trigger-test")
    events: list[dict] = []
    contexts: list = []

    @app.on_sqs_message(queue=queue, batch_size=batch_size,
                        maximum_batching_window_in_seconds=window)
    def handle(event):
        events.append(event.to_dict())
        contexts.append(event.context)
        failed = [r.to_dict()["messageId"] for r in event if r.body == fail_body]
        return {"batchItemFailures": [{"itemIdentifier": mid} for mid in failed]}

    return app, events, contexts


def test_discover_reads_decorators_and_function_config():
    app = Chalice(app_name="demo")

    @app.on_sqs_message(queue="by-name", batch_size=7, maximum_batching_window_in_seconds=2)
    def by_name(event):
        return None

    @app.on_sqs_message(queue_arn="arn:aws:sqs:eu-west-1:210987654321:by-arn")
    def by_arn(event):
        return None

    @app.route("/")
    def index():
        return {}

    config = Config(chalice_stage="prod", config_from_disk={
        "stages": {"prod": {}},
        "lambda_functions": {"by_name": {"lambda_timeout": 9, "lambda_memory_size": 512}},
    })
    first, second = discover(app, config, "prod")
    assert (first.name, first.queue_name, first.queue_owner) == ("by_name", "by-name", None)
    assert (first.batch_size, first.batching_window) == (7, 2)
    assert (first.timeout_seconds, first.memory_mb) == (9, 512)
    assert first.function_name == "demo-prod-by_name"
    assert first.handler is app.handler_map["by_name"]
    assert (second.queue_name, second.queue_owner) == ("by-arn", "210987654321")
    assert (second.batch_size, second.timeout_seconds, second.memory_mb) == (1, 60, 128)


def test_event_is_shaped_like_lambdas(sqs):
    name, url = new_queue(sqs)
    app, events, contexts = recording_app(name)
    sqs.send_message(QueueUrl=url, MessageBody='{"ident":"1"}', MessageAttributes={
        "kind": {"DataType": "String", "StringValue": "flespi"},
        "raw": {"DataType": "Binary", "BinaryValue": b"\x00\x01"},
    })
    assert poller_for(app, sqs, "handle").poll_once() == set()

    (record,) = events[0]["Records"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]
    assert record["body"] == '{"ident":"1"}'
    assert record["md5OfBody"] == hashlib.md5(b'{"ident":"1"}').hexdigest()
    assert record["messageId"] and record["receiptHandle"]
    assert record["attributes"]["ApproximateReceiveCount"] == "1"
    assert {"SentTimestamp", "ApproximateFirstReceiveTimestamp"} <= set(record["attributes"])
    assert record["messageAttributes"]["kind"] == {
        "stringValue": "flespi", "stringListValues": [], "binaryListValues": [],
        "dataType": "String",
    }
    assert record["messageAttributes"]["raw"]["binaryValue"] == base64.b64encode(b"\0\1").decode()
    assert "md5OfMessageAttributes" in record
    assert record["eventSource"] == "aws:sqs"
    assert record["eventSourceARN"] == arn["QueueArn"]
    assert record["awsRegion"] == "us-east-1"
    assert contexts[0].function_name == "trigger-test-dev-handle"
    assert 0 < contexts[0].get_remaining_time_in_millis() <= 60_000
    # Succeeded records are deleted.
    assert "Messages" not in sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0)


@pytest.mark.parametrize(("batch_size", "window", "sent", "first_batch"), [
    (10, 0, 15, 10),   # one ReceiveMessage, capped by batch_size
    (25, 1, 25, 25),   # the window gathers more than one ReceiveMessage can return
    (4, 0, 6, 4),
])
def test_batch_size_and_window(sqs, batch_size, window, sent, first_batch):
    name, url = new_queue(sqs, visibility=30)
    app, events, _ = recording_app(name, batch_size=batch_size, window=window)
    for start in range(0, sent, 10):
        sqs.send_message_batch(QueueUrl=url, Entries=[
            {"Id": str(i), "MessageBody": str(i)} for i in range(start, min(sent, start + 10))
        ])
    poller = poller_for(app, sqs, "handle")
    poller.poll_once()
    assert len(events[0]["Records"]) == first_batch
    bodies = [r["body"] for r in events[0]["Records"]]
    while len(bodies) < sent:
        if poller.poll_once() is not None:
            bodies += [r["body"] for r in events[-1]["Records"]]
    assert sorted(bodies, key=int) == [str(i) for i in range(sent)]


def test_reported_failure_comes_back_after_visibility_timeout(sqs):
    name, url = new_queue(sqs, visibility=1)
    app, events, _ = recording_app(name, fail_body="bad")
    sqs.send_message_batch(QueueUrl=url, Entries=[
        {"Id": body, "MessageBody": body} for body in ("ok-1", "bad", "ok-2")
    ])
    poller = poller_for(app, sqs, "handle")
    (bad_id,) = poller.poll_once()

    assert poller.poll_once() == {bad_id}  # long poll outlasts the 1 s visibility
    (again,) = events[1]["Records"]
    assert (again["messageId"], again["body"]) == (bad_id, "bad")
    assert again["attributes"]["ApproximateReceiveCount"] == "2"


def test_exception_leaves_whole_batch(sqs):
    name, url = new_queue(sqs, visibility=1)
    app = Chalice(app_name="raising")
    calls: list[int] = []

    @app.on_sqs_message(queue=name, batch_size=10)
    def handle(event):
        calls.append(len(event.to_dict()["Records"]))
        if len(calls) == 1:
            raise RuntimeError("sink down")

    sqs.send_message_batch(QueueUrl=url, Entries=[
        {"Id": str(i), "MessageBody": str(i)} for i in range(3)
    ])
    poller = poller_for(app, sqs, "handle")
    assert len(poller.poll_once()) == 3
    assert poller.poll_once() == set()
    assert calls == [3, 3]


def test_failed_ids_reads_responses_like_lambda():
    records = [{"messageId": "a"}, {"messageId": "b"}]
    assert failed_ids(None, records) == set()
    assert failed_ids({"batchItemFailures": []}, records) == set()
    assert failed_ids({"batchItemFailures": [{"itemIdentifier": "b"}]}, records) == {"b"}
    # An identifier that names no record of the batch fails all of it.
    assert failed_ids({"batchItemFailures": [{"itemIdentifier": "zz"}]}, records) == {"a", "b"}
    assert failed_ids({"batchItemFailures": [{}]}, records) == {"a", "b"}
