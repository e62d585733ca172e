"""The seed's naive Lambda, re-implemented as the benchmark's baseline.

``make bench`` reports our ingest as a multiple of this function, so it must
stay exactly as naive as the original, which published 42,000 messages per
minute: parse the body with ``json``, send chunks of 10 with one
``send_message_batch`` each, one after the other, ``json.dumps`` every
message, and answer 200 without looking at ``Failed``. Its API declared no
binary types, so API Gateway hands it the body as text. Do not improve it.
"""
import json
import os

import boto3

# Container scope, as the seed had it: one client and one GetQueueUrl per
# container, not per request.
sqs = boto3.client("sqs")
QUEUE_URL = sqs.get_queue_url(QueueName=os.environ["QUEUE_NAME"])["QueueUrl"]


def lambda_handler(event, context):
    """API Gateway proxy handler: every flespi message of the body into SQS."""
    messages = json.loads(event["body"])
    for start in range(0, len(messages), 10):
        chunk = messages[start : start + 10]
        sqs.send_message_batch(
            QueueUrl=QUEUE_URL,
            Entries=[{"Id": str(i), "MessageBody": json.dumps(m)} for i, m in enumerate(chunk)],
        )
    return {"statusCode": 200, "body": json.dumps({"sent": len(messages)})}
