"""The ingest path under SQS faults injected at the HTTP boundary.

A fault-injecting proxy (tools/faulty_sqs.py) stands between the app and a
real moto SQS. The invariant: 200 only when every message is in SQS; any
other answer, followed by flespi's resend, ends with every message in SQS.
"""
from __future__ import annotations

import base64
import json
from collections import Counter

import orjson
import pytest
from chalice.test import Client

import app as app_module
from chalicelib import ingest
from chalicelib.config import Settings
from sqs_helpers import drain, flespi_messages, make_batch, make_queue
from tools.faulty_sqs import FaultPlan, FaultySqs

JSON = {"content-type": "application/json"}


@pytest.fixture()
def faulty(moto_server, sqs, monkeypatch):
    """Route /flespi through a proxy with the given fault plan."""
    proxies: list[FaultySqs] = []

    def configure(plan: FaultPlan, fifo: bool = False, **overrides):
        proxy = FaultySqs(moto_server, plan).__enter__()
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        name, url = make_queue(sqs, fifo=fifo)
        monkeypatch.setattr(app_module, "SETTINGS", Settings(queue_name=name, **overrides))
        ingest.sender.cache_clear()
        return proxy, url

    yield configure
    ingest.sender.cache_clear()
    for proxy in proxies:
        proxy.__exit__()


def post(body: bytes) -> tuple[int, dict]:
    with Client(app_module.app) as client:
        response = client.http.post("/flespi", headers=JSON, body=body)
    return response.status_code, json.loads(response.body)


def post_like_flespi(body: bytes, attempts: int = 20) -> list[int]:
    """Resend the same batch until it is answered 200, as flespi does."""
    statuses = []
    for _ in range(attempts):
        statuses.append(post(body)[0])
        if statuses[-1] == 200:
            return statuses
    raise AssertionError(f"never got 200: {statuses}")


MATRIX = {
    "failed entries": FaultPlan(entry_failed=0.3, seed=1),
    "server errors": FaultPlan(server_error=0.3, seed=2),
    "throttling": FaultPlan(throttle=0.4, seed=3),
    "reset before SQS": FaultPlan(reset_before=0.3, seed=4),
    "reset after SQS stored": FaultPlan(reset_after=0.3, seed=5),
    "everything at once": FaultPlan(entry_failed=0.1, server_error=0.1, throttle=0.1,
                                    reset_before=0.05, reset_after=0.05, seed=6),
}


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("plan", MATRIX.values(), ids=MATRIX.keys())
def test_retried_faults_lose_nothing(faulty, sqs, samples, plan, packing):
    proxy, url = faulty(plan, packing=packing, send_concurrency=4)
    batch = make_batch(samples, 160)
    statuses = []
    for start in range(0, 160, 20):  # a stream: eight requests, one at a time
        statuses += post_like_flespi(orjson.dumps(batch[start:start + 20]))
    landed = Counter(m["test.seq"] for m in flespi_messages(drain(sqs, url)))
    assert set(landed) == set(range(160)), "a message was lost"
    if plan.reset_after == 0:  # retried in-request, nothing stored twice
        assert set(statuses) == {200} and max(landed.values()) == 1, (statuses, landed)
    counts = proxy.counts
    injected = (counts.server_errors + counts.throttles + counts.resets_before
                + counts.resets_after + counts.entries_failed)
    assert injected > 0, "the plan injected no fault: the test proved nothing"


def test_duplicates_only_come_from_calls_sqs_stored_but_could_not_confirm(faulty, sqs,
                                                                          samples):
    proxy, url = faulty(FaultPlan(entry_failed=0.5, server_error=0.2, seed=7))
    assert post(orjson.dumps(make_batch(samples, 100)))[0] == 200
    landed = Counter(m["test.seq"] for m in flespi_messages(drain(sqs, url)))
    assert landed == Counter(range(100))
    assert proxy.counts.entries_failed and proxy.counts.server_errors


def test_permanent_entry_failure_gets_503_and_resend_completes(faulty, sqs, samples):
    proxy, url = faulty(FaultPlan(entry_sender_fault=0.2, seed=8))
    body = orjson.dumps(make_batch(samples, 50))
    status, answer = post(body)
    assert status == 503 and answer["unsent"] > 0
    assert "InvalidMessageContents" in answer["error"]
    proxy.plan.entry_sender_fault = 0
    assert post(body)[0] == 200
    landed = {m["test.seq"] for m in flespi_messages(drain(sqs, url))}
    assert landed == set(range(50))


def test_sqs_slower_than_the_deadline_gets_503_in_time(faulty, sqs, samples):
    import time

    proxy, url = faulty(FaultPlan(delay=1.5), send_deadline=0.5)
    started = time.monotonic()
    status, answer = post(orjson.dumps(make_batch(samples, 20)))
    assert status == 503 and answer["unsent"] == 20 - answer["stored"]
    assert time.monotonic() - started < 2.5  # gave up at the deadline, not later


class NearlyOutOfTime:
    """A Lambda context with less time left than the answer needs."""

    aws_request_id = "test"
    function_name = "api_handler"

    def get_remaining_time_in_millis(self) -> int:
        return 800


def test_lambda_about_to_time_out_sends_nothing_and_says_503(faulty, sqs, samples):
    proxy, url = faulty(FaultPlan())
    event = {
        "httpMethod": "POST", "resource": "/flespi", "path": "/flespi",
        "headers": JSON, "multiValueHeaders": {}, "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "pathParameters": None, "stageVariables": None,
        "requestContext": {"resourcePath": "/flespi", "httpMethod": "POST", "stage": "api"},
        "body": base64.b64encode(orjson.dumps(make_batch(samples, 10))).decode(),
        "isBase64Encoded": True,
    }
    response = app_module.app(event, NearlyOutOfTime())
    assert response["statusCode"] == 503
    assert json.loads(response["body"])["unsent"] == 10
    assert proxy.counts.calls == 0 and drain(sqs, url) == []


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_fifo_resends_after_faults_leave_no_duplicates(faulty, sqs, samples, packing):
    proxy, url = faulty(
        FaultPlan(entry_failed=0.2, server_error=0.2, reset_after=0.2, seed=9),
        fifo=True, packing=packing,
    )
    post_like_flespi(orjson.dumps(make_batch(samples, 60, devices=3)))
    landed = Counter(m["test.seq"] for m in flespi_messages(drain(sqs, url)))
    assert landed == Counter(range(60))
