"""Nothing lost, end to end: an independent fault-injecting SQS, flespi-like resends,
and a consumer whose sink fails, hangs and meets poison.

The pipeline is ``make run``'s (``tools.soak.Pipeline`` assembles
``tools.local_run``'s pieces): Chalice's local HTTP server with the API-key
gateway serving app.py, the local SQS trigger running ``consume``, moto as
SQS with a redrive policy. The app's SendMessageBatch calls go through
``tools.faulty_sqs``; the streams are ``tools.simulate``'s, resending each
batch until it gets a 200. Every message carries a ``soak.id``, and every
check is set arithmetic over those ids as SQS and the sink saw them.

Each fault test also asserts its fault was really injected, so none of them
can pass by accident.
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace
from typing import Any, Iterator

import pytest
from chalice.cli.factory import CLIFactory

import app as app_module
from chalicelib import ingest
from chalicelib.config import Settings
from conftest import ROOT
from sqs_helpers import drain
from tools.faulty_sqs import FaultPlan, FaultySqs
from tools.soak import (Pipeline, SinkReceiver, StreamRun, StreamSettings, message_ids,
                        run_streams, take_all)

KEY = "reliability-key"
_names = itertools.count()

#: Every ingest fault at once, seeded. A permanent entry failure
#: (entry_sender_fault) makes the app answer 503, so flespi's resend path
#: really runs. Packed requests make one SQS entry each, so they get higher
#: rates and smaller batches (more calls) for every fault to show up.
UNPACKED_FAULTS = FaultPlan(entry_failed=0.2, server_error=0.2, throttle=0.2, reset_before=0.15,
                            reset_after=0.15, entry_sender_fault=0.02, seed=11)
PACKED_FAULTS = FaultPlan(entry_failed=0.2, server_error=0.2, throttle=0.2, reset_before=0.15,
                          reset_after=0.15, entry_sender_fault=0.1, seed=12)
CASES = {  # packing, fifo, plan, messages per request
    "unpacked": (False, False, UNPACKED_FAULTS, 20),
    "packed": (True, False, PACKED_FAULTS, 5),
    # FIFO packs per device (4 entries a request) and stops a lane at its
    # first permanent failure: a lower rate gives as many 503s.
    "fifo-packed": (True, True, replace(PACKED_FAULTS, entry_sender_fault=0.06, seed=13), 10),
}


@pytest.fixture(scope="module")
def config() -> Any:
    """The project's Chalice config (stage dev), as ``make run`` reads it."""
    return CLIFactory(str(ROOT)).create_config_obj(chalice_stage_name="dev")


@pytest.fixture()
def pipeline(moto_server, sqs, monkeypatch, config) -> Iterator[Any]:
    """Build a pipeline on a fresh queue; the app's SQS calls go through ``plan``."""
    opened: list[Any] = []

    def build(plan: FaultPlan, *, packing: bool = False, fifo: bool = False,
              sink_url: str | None = None, consumers: int = 0, visibility_timeout: int = 1,
              max_receive_count: int = 3, consume_timeout: int | None = None,
              consume_batch_size: int | None = None) -> tuple[Pipeline, FaultySqs]:
        proxy = FaultySqs(moto_server, plan).__enter__()
        opened.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        name = f"reliability-{next(_names)}" + (".fifo" if fifo else "")
        monkeypatch.setattr(app_module, "SETTINGS", Settings(
            queue_name=name, packing=packing, send_concurrency=8,
            sink="http" if sink_url else "log", sink_url=sink_url, sink_timeout=1.0))
        ingest.sender.cache_clear()
        built = Pipeline(app_module.app, config, sqs, name, api_key=KEY,
                         visibility_timeout=visibility_timeout,
                         max_receive_count=max_receive_count, consumers=consumers,
                         consume_timeout=consume_timeout,
                         consume_batch_size=consume_batch_size).__enter__()
        opened.append(built)
        return built, proxy

    yield build
    for item in reversed(opened):
        item.__exit__(None, None, None)
    ingest.sender.cache_clear()


def streams(pipeline: Pipeline, streams: int = 3, count: int = 60,
            batch: int = 20) -> list[StreamRun]:
    """Flespi-like streams: ``count`` messages each, resent until 200."""
    settings = StreamSettings(streams=streams, batch=batch, devices=4, count=count, duration=45,
                              backoff=0.05, max_backoff=0.5)
    runs = run_streams(pipeline.url, KEY, settings)
    assert all(run.stats.acked == count for run in runs), [r.stats.summary() for r in runs]
    return runs


def acked(runs: list[StreamRun]) -> set[str]:
    return {i for run in runs for i in run.acked_ids()}


def injected(proxy: FaultySqs) -> dict[str, int]:
    counts = proxy.counts
    return {"server_errors": counts.server_errors, "throttles": counts.throttles,
            "resets_before": counts.resets_before, "resets_after": counts.resets_after,
            "entries_failed": counts.entries_failed}


# --------------------------------------------------------------------------- ingest


@pytest.mark.parametrize("packing,fifo,plan,batch", CASES.values(), ids=CASES.keys())
def test_faulty_sqs_and_flespi_resends_lose_nothing(pipeline, sqs, packing, fifo, plan, batch):
    pipe, proxy = pipeline(replace(plan), packing=packing, fifo=fifo)
    runs = streams(pipe, count=80, batch=batch)
    landed = Counter(message_ids(m["Body"] for m in drain(sqs, pipe.queue_url())))
    lost = acked(runs) - set(landed)
    duplicates = sum(n - 1 for n in landed.values())
    answers = Counter()
    for run in runs:
        answers.update(run.stats.statuses)
    print(f"\n{'fifo' if fifo else 'standard'} packing={packing}: acked {len(acked(runs))}, "
          f"landed {len(landed)}, duplicates {duplicates}, answers {dict(answers)}, "
          f"faults {injected(proxy)}")
    assert not lost, f"lost {len(lost)}: {sorted(lost)[:5]}"
    assert set(landed) <= {i for run in runs for i in run.offered}
    assert all(injected(proxy).values()), injected(proxy)  # every fault kind happened
    assert answers["503"] > 0, "no request was refused, so flespi's resend never ran"
    if fifo:  # resends within the 5-minute window are deduplicated by SQS
        assert duplicates == 0, landed.most_common(3)


def test_the_proxy_can_fail_a_single_entry_batch(moto_server, sqs):
    """Packed requests are often one SQS entry; the proxy used to forward a
    batch whose every entry it had failed, so packed mode saw no entry faults."""
    from sqs_helpers import make_queue

    _, url = make_queue(sqs)
    with FaultySqs(moto_server, FaultPlan(entry_failed=1.0)) as proxy:
        import boto3

        client = boto3.client("sqs", endpoint_url=proxy.url, region_name="us-east-1")
        answer = client.send_message_batch(QueueUrl=url, Entries=[{"Id": "0", "MessageBody": "x"}])
    assert [f["Id"] for f in answer["Failed"]] == ["0"] and not answer.get("Successful")
    assert drain(sqs, url) == [] and proxy.counts.entries_failed == 1


# --------------------------------------------------------------------------- consumer


class DeleteAudit:
    """botocore event hooks on the trigger's SQS client: at every delete, were
    the deleted records' messages already at the sink?"""

    def __init__(self, sqs: Any, receiver: SinkReceiver) -> None:
        self._sqs, self._receiver = sqs, receiver
        self._carried: dict[str, list[str]] = {}
        self.deleted_messages = 0
        self.violations: list[str] = []
        sqs.meta.events.register("after-call.sqs.ReceiveMessage", self._received)
        sqs.meta.events.register("provide-client-params.sqs.DeleteMessageBatch", self._deleting)

    def _received(self, parsed: dict, **_: Any) -> None:
        for message in parsed.get("Messages", []):
            self._carried[message["ReceiptHandle"]] = message_ids([message["Body"]])

    def _deleting(self, params: dict, **_: Any) -> None:
        delivered = self._receiver.delivered_ids()
        for entry in params.get("Entries", []):
            ids = self._carried.get(entry["ReceiptHandle"], [])
            self.deleted_messages += len(ids)
            self.violations += [i for i in ids if i not in delivered]

    def stop(self) -> None:
        self._sqs.meta.events.unregister("after-call.sqs.ReceiveMessage", self._received)
        self._sqs.meta.events.unregister("provide-client-params.sqs.DeleteMessageBatch",
                                         self._deleting)


POISON = ["{not json", "42", '["a string, not a message"]']


def test_intermittent_sink_and_poison_records(pipeline, sqs):
    """The sink answers 500 to 40% of POSTs; three records are poison. Every
    acked message reaches the sink, each delete follows delivery, and exactly
    the poison ends in the DLQ after maxReceiveCount receives."""
    with SinkReceiver(fail=0.4, seed=5) as receiver:
        audit = DeleteAudit(sqs, receiver)
        pipe, _ = pipeline(FaultPlan(), sink_url=receiver.url, consumers=1,
                           max_receive_count=3, consume_batch_size=10)
        for body in POISON:
            sqs.send_message(QueueUrl=pipe.queue_url(), MessageBody=body)
        runs = streams(pipe, streams=2, count=60)
        assert pipe.wait_drained(40), f"{pipe.queued()} records still queued"
        pipe.stop_consumers()
        audit.stop()
        dead = take_all(sqs, pipe.queue_url(pipe.dlq_name))
    counts = receiver.counts
    print(f"\nintermittent sink: acked {len(acked(runs))}, delivered {len(counts.delivered)}, "
          f"posts {counts.posts}, answered 500 {counts.rejected}, duplicates "
          f"{sum(n - 1 for n in counts.delivered.values())}, deleted after delivery "
          f"{audit.deleted_messages}, deleted before {len(audit.violations)}, DLQ {len(dead)}")
    assert sorted(m["Body"] for m in dead) == sorted(POISON)
    assert not acked(runs) - set(receiver.counts.delivered), "an acked message never arrived"
    assert receiver.counts.rejected > 0, "the sink never failed: the test proved nothing"
    assert audit.deleted_messages >= len(acked(runs)) and audit.violations == []


def test_consumer_timeout_redelivers_and_loses_nothing(pipeline, sqs):
    """The sink hangs past the consumer's Lambda deadline on its first two POSTs:
    those records are reported failed, come back after the visibility timeout
    and are delivered again (duplicates, counted); nothing reaches the DLQ."""
    with SinkReceiver(hang_first=2, hang_seconds=3.0) as receiver:
        audit = DeleteAudit(sqs, receiver)
        pipe, _ = pipeline(FaultPlan(), sink_url=receiver.url, consumers=1,
                           visibility_timeout=3, max_receive_count=5, consume_timeout=2)
        runs = streams(pipe, streams=2, count=40)
        assert pipe.wait_drained(40), f"{pipe.queued()} records still queued"
        pipe.stop_consumers()
        audit.stop()
        dead = take_all(sqs, pipe.queue_url(pipe.dlq_name))
    delivered = receiver.counts.delivered
    print(f"\nconsumer timeout: hung {receiver.counts.hung}, delivered {len(delivered)}, "
          f"duplicates {sum(n - 1 for n in delivered.values())}")
    assert receiver.counts.hung == 2
    assert dead == []
    assert not acked(runs) - set(delivered)
    assert max(delivered.values()) >= 2, "the timed-out records were never redelivered"
    assert audit.violations == []
