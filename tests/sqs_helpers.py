"""Helpers for tests that read what really landed in a (moto) SQS queue."""
from __future__ import annotations

import itertools
import json
from typing import Any

_names = itertools.count()


def make_queue(sqs: Any, fifo: bool = False, prefix: str = "test") -> tuple[str, str]:
    """A fresh queue per test keeps moto fast and tests independent."""
    name = f"{prefix}-{next(_names)}-{id(sqs) % 10_000}" + (".fifo" if fifo else "")
    attributes = {"FifoQueue": "true"} if fifo else {}
    url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    return name, url


def drain(sqs: Any, url: str) -> list[dict]:
    """Every message now in the queue, received and deleted.

    Deleting matters on FIFO queues: SQS holds back a group's later messages
    while earlier ones are in flight.
    """
    received: list[dict] = []
    while True:
        batch = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            VisibilityTimeout=600,
            AttributeNames=["All"],
        ).get("Messages", [])
        if not batch:
            return received
        received.extend(batch)
        sqs.delete_message_batch(
            QueueUrl=url,
            Entries=[{"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(batch)],
        )


def flespi_messages(sqs_messages: list[dict]) -> list[dict]:
    """Unpack SQS bodies (object or packed array) into flespi messages, in order."""
    out: list[dict] = []
    for message in sqs_messages:
        body = json.loads(message["Body"])
        out.extend(body if isinstance(body, list) else [body])
    return out


def make_batch(samples: list[dict], count: int, devices: int = 5) -> list[dict]:
    """``count`` distinct realistic messages over ``devices`` devices."""
    batch = []
    for n in range(count):
        message = dict(samples[n % len(samples)])
        message["ident"] = f"35{n % devices:013d}"
        message["timestamp"] = 1_700_000_000 + n
        message["test.seq"] = n
        batch.append(message)
    return batch
