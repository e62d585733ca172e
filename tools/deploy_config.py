"""Per-stage deployment settings: what `make deploy` and `make package` build.

Two files feed it. ``.chalice/config.json`` stays Chalice's own (stages, the
queue name in ``QUEUE_NAME``, each function's timeout); ``.chalice/deploy.json``
holds what Chalice has no notion of: redrive, retention, the usage plan's
throttle and quota, the source-IP allow-list. Both the boto3 provisioning and
the CloudFormation template are derived from one ``StageSettings`` value, so
the two ways of deploying cannot drift apart.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from chalice.config import Config
from chalice.constants import DEFAULT_LAMBDA_TIMEOUT

#: Lambda's advice for SQS triggers: visibility timeout at least six times
#: the function timeout, so a throttled or retried batch is not redelivered
#: while still in flight.
VISIBILITY_TIMEOUT_FACTOR = 6
#: SQS bounds (seconds).
MAX_VISIBILITY_TIMEOUT = 43_200
MIN_RETENTION, MAX_RETENTION = 60, 1_209_600
QUOTA_PERIODS = ("DAY", "WEEK", "MONTH")
CONSUMER = "consume"
API_HANDLER = "api_handler"

DEFAULTS: Mapping[str, Any] = {
    # A message that fails this many deliveries goes to the DLQ.
    "max_receive_count": 5,
    # The queue is a buffer: 4 days covers a long weekend of a broken consumer.
    "retention_seconds": 345_600,
    # The DLQ keeps failures as long as SQS allows. It must outlive the main
    # queue: a standard queue's message keeps its original enqueue time there.
    "dlq_retention_seconds": MAX_RETENTION,
    # Requests per second (each carries a whole flespi batch).
    "throttle": {"rateLimit": 20, "burstLimit": 40},
    "quota": None,
    "source_ips": [],
}


class DeployConfigError(ValueError):
    """The stage or one of its settings is unusable; nothing has been changed."""


@dataclass(frozen=True)
class Throttle:
    rate_limit: float
    burst_limit: int


@dataclass(frozen=True)
class Quota:
    limit: int
    period: str


@dataclass(frozen=True)
class StageSettings:
    """Everything the deploy steps and the template need for one stage."""

    app_name: str
    stage: str
    api_gateway_stage: str
    queue_name: str
    consume_timeout: int
    max_receive_count: int
    retention_seconds: int
    dlq_retention_seconds: int
    throttle: Throttle
    quota: Quota | None
    source_ips: tuple[str, ...]

    @property
    def fifo(self) -> bool:
        """SQS decides FIFO-ness by the name's suffix, and so does the app."""
        return self.queue_name.endswith(".fifo")

    @property
    def dlq_name(self) -> str:
        """A FIFO queue's DLQ must be FIFO too, so the suffix stays last."""
        base = self.queue_name.removesuffix(".fifo")
        return f"{base}-dlq.fifo" if self.fifo else f"{base}-dlq"

    @property
    def visibility_timeout(self) -> int:
        return min(VISIBILITY_TIMEOUT_FACTOR * self.consume_timeout, MAX_VISIBILITY_TIMEOUT)

    @property
    def resource_prefix(self) -> str:
        """The name Chalice gives this stage's API function; we reuse it."""
        return f"{self.app_name}-{self.stage}"

    @property
    def api_key_prefix(self) -> str:
        """Keys are ``<prefix>1``, ``<prefix>2``, … so rotation can add one."""
        return f"{self.resource_prefix}-key-"

    def function_name(self, function: str) -> str:
        """Chalice's naming: the API handler is the bare prefix."""
        if function == API_HANDLER:
            return self.resource_prefix
        return f"{self.resource_prefix}-{function}"

    def queue_attributes(self) -> dict[str, Any]:
        """The main queue's attributes, less the redrive target (known later).

        Names are shared by the SQS API and CloudFormation's AWS::SQS::Queue.
        """
        attributes: dict[str, Any] = {
            "VisibilityTimeout": self.visibility_timeout,
            "MessageRetentionPeriod": self.retention_seconds,
            "SqsManagedSseEnabled": True,
        }
        return attributes | self._fifo_attributes()

    def dlq_attributes(self) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "MessageRetentionPeriod": self.dlq_retention_seconds,
            "SqsManagedSseEnabled": True,
        }
        return attributes | self._fifo_attributes()

    def _fifo_attributes(self) -> dict[str, Any]:
        # The sender sets MessageDeduplicationId itself (SHA-256 of the body).
        return {"FifoQueue": True} if self.fifo else {}


def load(project_dir: Path, stage: str) -> StageSettings:
    """Read and validate one stage's settings; raise with a fix-it message."""
    chalice_config = _read_json(project_dir / ".chalice" / "config.json")
    if stage not in chalice_config.get("stages", {}):
        known = ", ".join(sorted(chalice_config.get("stages", {}))) or "none"
        raise DeployConfigError(
            f"stage {stage!r} is not in .chalice/config.json (stages: {known})"
        )
    # Chalice's own lookup: function in stage, stage, function, top level.
    consumer = Config(chalice_stage=stage, function_name=CONSUMER, config_from_disk=chalice_config)
    queue_name = consumer.environment_variables.get("QUEUE_NAME", "").strip()
    if not queue_name:
        raise DeployConfigError(
            f"stage {stage!r} has no QUEUE_NAME in .chalice/config.json environment_variables"
        )
    overrides = _deploy_overrides(project_dir, stage)
    return StageSettings(
        app_name=consumer.app_name,
        stage=stage,
        api_gateway_stage=consumer.api_gateway_stage or "api",
        queue_name=queue_name,
        consume_timeout=int(consumer.lambda_timeout or DEFAULT_LAMBDA_TIMEOUT),
        max_receive_count=_int(overrides, "max_receive_count", 1, 1000),
        retention_seconds=_int(overrides, "retention_seconds", MIN_RETENTION, MAX_RETENTION),
        dlq_retention_seconds=_int(
            overrides, "dlq_retention_seconds", MIN_RETENTION, MAX_RETENTION
        ),
        throttle=_throttle(overrides["throttle"]),
        quota=_quota(overrides["quota"]),
        source_ips=_cidrs(overrides["source_ips"]),
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DeployConfigError(f"{path} is missing") from None
    except ValueError as error:
        raise DeployConfigError(f"{path} is not valid JSON: {error}") from None


def _deploy_overrides(project_dir: Path, stage: str) -> dict[str, Any]:
    """Defaults, then the file's ``defaults``, then its ``stages.<stage>``."""
    path = project_dir / ".chalice" / "deploy.json"
    on_disk = _read_json(path) if path.exists() else {}
    merged = dict(DEFAULTS) | on_disk.get("defaults", {}) | on_disk.get("stages", {}).get(stage, {})
    unknown = set(merged) - set(DEFAULTS)
    if unknown:
        raise DeployConfigError(f".chalice/deploy.json: unknown setting(s) {sorted(unknown)}")
    return merged


def _int(settings: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = settings[name]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise DeployConfigError(
            f".chalice/deploy.json: {name} must be an integer in {low}..{high}, not {value!r}"
        )
    return value


def _throttle(raw: Any) -> Throttle:
    try:
        rate, burst = raw["rateLimit"], raw["burstLimit"]
    except (TypeError, KeyError):
        raise DeployConfigError(
            ".chalice/deploy.json: throttle must be {\"rateLimit\": …, \"burstLimit\": …}"
        ) from None
    if not isinstance(rate, (int, float)) or rate <= 0 or not isinstance(burst, int) or burst < 1:
        raise DeployConfigError(
            ".chalice/deploy.json: throttle needs a positive rateLimit and an integer burstLimit ≥ 1"
        )
    return Throttle(rate_limit=rate, burst_limit=burst)


def _quota(raw: Any) -> Quota | None:
    if raw is None:
        return None
    try:
        limit, period = raw["limit"], raw["period"]
    except (TypeError, KeyError):
        raise DeployConfigError(
            ".chalice/deploy.json: quota must be null or {\"limit\": …, \"period\": \"DAY\"}"
        ) from None
    if not isinstance(limit, int) or limit < 1 or period not in QUOTA_PERIODS:
        raise DeployConfigError(
            f".chalice/deploy.json: quota needs an integer limit ≥ 1 and a period in {QUOTA_PERIODS}"
        )
    return Quota(limit=limit, period=period)


def _cidrs(raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise DeployConfigError(".chalice/deploy.json: source_ips must be a list of CIDRs")
    try:
        return tuple(str(ipaddress.ip_network(cidr)) for cidr in raw)
    except (TypeError, ValueError) as error:
        raise DeployConfigError(f".chalice/deploy.json: source_ips: {error}") from None
