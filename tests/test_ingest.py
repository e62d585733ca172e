"""POST /flespi through Chalice's own test client, against a real moto SQS."""
from __future__ import annotations

import gzip
import json

import orjson
import pytest
from chalice.test import Client

import app as app_module
from chalicelib import config, ingest
from chalicelib.config import Settings
from sqs_helpers import drain, flespi_messages, make_batch, make_queue

JSON = {"content-type": "application/json"}


@pytest.fixture()
def route(moto_server, sqs, monkeypatch):
    """Post to /flespi with given settings; returns (post, queue_url)."""

    def configure(fifo: bool = False, **overrides):
        name, url = make_queue(sqs, fifo=fifo)
        settings = Settings(queue_name=name, **overrides)
        monkeypatch.setattr(app_module, "SETTINGS", settings)

        def post(body: bytes, headers: dict | None = None):
            with Client(app_module.app) as client:
                response = client.http.post(
                    "/flespi", headers=headers or JSON, body=body
                )
            return response.status_code, json.loads(response.body)

        return post, url

    ingest.sender.cache_clear()
    yield configure
    ingest.sender.cache_clear()


@pytest.mark.parametrize("packing", [False, True])
def test_every_message_lands_once_and_untouched(route, sqs, samples, packing):
    post, url = route(packing=packing)
    batch = make_batch(samples, 120)
    status, body = post(orjson.dumps(batch))
    assert status == 200, body
    assert body["accepted"] == 120
    landed = drain(sqs, url)
    assert flespi_messages(landed) == batch if packing else sorted(
        flespi_messages(landed), key=lambda m: m["test.seq"]
    ) == batch
    assert body["sqs_messages"] == len(landed) == (1 if packing else 120)
    if not packing:  # compact JSON, keys in the sender's order
        assert {m["Body"] for m in landed} == {orjson.dumps(m).decode() for m in batch}


def test_empty_array_sends_nothing(route, sqs):
    post, url = route()
    assert post(b"[]") == (200, {"accepted": 0, "sqs_messages": 0, "sqs_calls": 0})
    assert drain(sqs, url) == []


def test_one_object_is_one_message(route, sqs, samples):
    post, url = route()
    status, body = post(orjson.dumps(samples[0]))
    assert (status, body["accepted"]) == (200, 1)
    assert flespi_messages(drain(sqs, url)) == [samples[0]]


@pytest.mark.parametrize("content_type", ["application/json", "text/plain; charset=utf-8",
                                          "application/octet-stream"])
def test_gzip_bodies_of_every_accepted_type(route, sqs, samples, content_type):
    post, url = route()
    headers = {"content-type": content_type, "content-encoding": "gzip"}
    status, body = post(gzip.compress(orjson.dumps(samples)), headers)
    assert (status, body["accepted"]) == (200, len(samples))
    assert len(drain(sqs, url)) == len(samples)


def test_non_ascii_and_sqs_forbidden_characters_survive(route, sqs):
    post, url = route()
    messages = [
        {"ident": "1", "device.name": "Грузовик Łódź 🚚", "text": "a\"b\\c\nd"},
        {"ident": "2", "text": "\ufffe and \uffff are valid JSON but not SQS"},
    ]
    status, _ = post(orjson.dumps(messages))
    assert status == 200
    landed = drain(sqs, url)
    assert sorted(flespi_messages(landed), key=lambda m: m["ident"]) == messages
    assert any("\\ufffe" in m["Body"] for m in landed)


HOSTILE = {
    "not json": b"hello",
    "empty body": b"",
    "truncated": b'[{"ident": "1"',
    "invalid utf-8": b'[{"ident": "\xff\xfe"}]',
    "raw surrogate": b'[{"ident": "\xed\xa0\x80"}]',
    "lone surrogate escape": b'[{"ident": "\\ud800"}]',
    "NaN": b'[{"x": NaN}]',
    "Infinity": b'[{"x": -Infinity}]',
    "overflowing number": b'[{"x": 1e999}]',
    "too deep": b"[" * 5000 + b"]" * 5000,
    "scalar": b"42",
    "array of strings": b'[{"ident": "1"}, "two"]',
    "array of arrays": b"[[]]",
    "null element": b'[{"ident": "1"}, null]',
}


@pytest.mark.parametrize("body", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_bodies_get_400_and_send_nothing(route, sqs, body):
    post, url = route()
    status, answer = post(body)
    assert status == 400
    assert answer["error"]
    assert drain(sqs, url) == []


def test_400_names_the_bad_message_index(route):
    post, _ = route()
    assert "message 1 " in post(b'[{"ident": "1"}, "two"]')[1]["error"]


@pytest.mark.parametrize("packing", [False, True])
def test_oversize_message_gets_413_naming_it_and_nothing_is_sent(route, sqs, packing):
    post, url = route(packing=packing)
    messages = [{"ident": "1"}, {"ident": "2", "blob": "x" * 1_048_576}]
    status, answer = post(orjson.dumps(messages))
    assert status == 413
    assert "message 1 " in answer["error"] and "1,048,5" in answer["error"]
    assert drain(sqs, url) == []


def test_message_of_exactly_the_limit_is_taken(route, sqs):
    post, url = route()
    frame = len(orjson.dumps({"blob": ""}))
    message = {"blob": "x" * (1_048_576 - frame)}
    assert post(orjson.dumps([message]))[0] == 200
    assert flespi_messages(drain(sqs, url)) == [message]


@pytest.mark.parametrize("headers", [
    {"content-type": "text/xml"},
    {"content-type": "multipart/form-data; boundary=x"},
    {"content-type": "application/json", "content-encoding": "br"},
])
def test_unsupported_media_gets_415(route, sqs, headers):
    post, url = route()
    status, answer = post(b"[]", headers)
    assert status == 415 and answer["error"]
    assert drain(sqs, url) == []


def test_gzip_bomb_is_refused_without_inflating_it(route, sqs):
    post, url = route()
    bomb = gzip.compress(b"[" + b" " * (64 * 1024 * 1024) + b"]", compresslevel=9)
    assert len(bomb) < 200_000
    status, answer = post(bomb, {"content-type": "application/json",
                                 "content-encoding": "gzip"})
    assert status == 413 and "inflates" in answer["error"]
    assert drain(sqs, url) == []


def test_corrupt_gzip_gets_400(route):
    post, _ = route()
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    assert post(gzip.compress(b"[]")[:-4], headers)[0] == 400
    assert post(b"not gzip", headers)[0] == 400


@pytest.mark.parametrize("packing", [False, True])
def test_fifo_groups_by_ident_dedups_resends_and_keeps_device_order(route, sqs, samples,
                                                                   packing):
    post, url = route(fifo=True, packing=packing)
    batch = make_batch(samples, 60, devices=4)
    assert post(orjson.dumps(batch))[0] == 200
    assert post(orjson.dumps(batch))[0] == 200  # flespi resends: SQS drops it
    landed = drain(sqs, url)
    messages = flespi_messages(landed)
    assert sorted(m["test.seq"] for m in messages) == list(range(60))
    for message in landed:
        group = message["Attributes"]["MessageGroupId"]
        body = json.loads(message["Body"])
        assert {m["ident"] for m in (body if packing else [body])} == {group}
    for ident in {m["ident"] for m in batch}:
        seqs = [m["test.seq"] for m in messages if m["ident"] == ident]
        assert seqs == sorted(seqs)


def test_unknown_queue_gets_503(moto_server, monkeypatch):
    monkeypatch.setattr(app_module, "SETTINGS", Settings(queue_name="no-such-queue"))
    ingest.sender.cache_clear()
    with Client(app_module.app) as client:
        response = client.http.post("/flespi", headers=JSON, body=b'[{"ident": "1"}]')
    assert response.status_code == 503
    assert "no-such-queue" in json.loads(response.body)["error"]


def test_answer_is_json_and_logs_one_line(route, samples, capfd):
    post, _ = route()
    capfd.readouterr()
    post(orjson.dumps(samples))
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines()
             if line.startswith("{")]
    [line] = [line for line in lines if line.get("operation") == "ingest"]
    assert line["messages"] == len(samples) and line["status"] == 200
    assert line["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "FlespiSqs"


def test_settings_come_from_the_environment():
    settings = config.from_env({"QUEUE_NAME": "q.fifo", "PACKING": "on", "SEND_CONCURRENCY": "7"})
    assert (settings.fifo, settings.packing, settings.send_concurrency) == (True, True, 7)
    assert settings.consume_batch_size == 10  # FIFO's Lambda maximum


@pytest.mark.parametrize("env", [{}, {"QUEUE_NAME": "q", "PACKING": "maybe"},
                                 {"QUEUE_NAME": "q", "SEND_CONCURRENCY": "0"},
                                 {"QUEUE_NAME": "q", "SINK": "http"}])
def test_bad_settings_fail_loudly(env):
    with pytest.raises(config.ConfigError):
        config.from_env(env)
