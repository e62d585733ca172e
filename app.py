"""Wiring only: the Chalice app, the ingest route and the SQS consumer.

The work lives in ``chalicelib``: ``ingest`` answers flespi, ``consumer``
hands queued messages to a sink.
"""
from chalice import Chalice

from chalicelib import config, consumer, ingest

SETTINGS = config.from_env()

app = Chalice(app_name="flespi-sqs")
# flespi's request bodies must reach us byte for byte (gzip, invalid UTF-8
# to reject), so API Gateway passes every accepted type as binary.
app.api.binary_types.extend(ingest.BINARY_REQUEST_TYPES)


@app.route("/flespi", methods=["POST"], api_key_required=True, content_types=["*/*"])
def flespi():
    """Put every message of a flespi batch into SQS; 200 only when all are in."""
    return ingest.handle(app.current_request, app.lambda_context, SETTINGS)


@app.on_sqs_message(
    queue=SETTINGS.queue_name,
    batch_size=SETTINGS.consume_batch_size,
    maximum_batching_window_in_seconds=SETTINGS.consume_batch_window,
)
def consume(event):
    """Hand every queued flespi message to the sink; report only failed records."""
    return consumer.handle(event.to_dict(), event.context, SETTINGS)
