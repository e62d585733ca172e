"""One JSON log line per unit of work that is also a CloudWatch metric record.

CloudWatch's embedded metric format (EMF) turns a structured log line into
metrics with no API call and no extra dependency: the ``_aws`` block names
which of the line's fields are metrics. aws-lambda-powertools' ``Metrics``
does the same but costs tens of milliseconds of cold-start import for one
``print``.

The lines go to stderr: Lambda sends stderr to CloudWatch Logs as well, and
stdout stays reserved for data (the consumer's ``log`` sink prints exactly
one line per flespi message there).
"""
from __future__ import annotations

import sys
import time
from typing import Mapping

import orjson

NAMESPACE = "FlespiSqs"


def emit(
    operation: str,
    counts: Mapping[str, int | float],
    fields: Mapping[str, object] | None = None,
    units: Mapping[str, str] | None = None,
) -> dict:
    """Print one EMF line: ``counts`` become metrics, ``fields`` plain log data.

    Returns the record so callers (and tests) can see what was logged.
    """
    units = units or {}
    record: dict = {
        "_aws": {
            "Timestamp": int(time.time() * 1000),
            "CloudWatchMetrics": [
                {
                    "Namespace": NAMESPACE,
                    "Dimensions": [["operation"]],
                    "Metrics": [
                        {"Name": name, "Unit": units.get(name, "Count")} for name in counts
                    ],
                }
            ],
        },
        "operation": operation,
        **counts,
        **(fields or {}),
    }
    sys.stderr.write(orjson.dumps(record, default=str).decode() + "\n")
    sys.stderr.flush()
    return record
