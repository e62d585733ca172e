"""Idempotent boto3 steps around ``chalice deploy``, and their undoing.

Each function takes the boto3 clients it needs, looks at what exists, changes
only what differs from the wanted state and says what it did in an
``Outcome``. That makes a second ``make deploy`` a no-op and lets the tests
run every step against a moto server instead of AWS.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

from tools.deploy_config import StageSettings
from tools.policies import allowed_cidrs, source_ip_policy

#: SQS attributes fixed at creation; asking to change them is an error.
CREATE_ONLY_ATTRIBUTES = frozenset({"FifoQueue"})
BATCH_ITEM_FAILURES = "ReportBatchItemFailures"


@dataclass(frozen=True)
class Outcome:
    """One line of progress: what happened to which thing."""

    action: str  # created | updated | unchanged | deleted | absent | kept
    subject: str

    @property
    def changed(self) -> bool:
        return self.action in ("created", "updated", "deleted")

    def __str__(self) -> str:
        return f"{self.action:<9} {self.subject}"


@dataclass(frozen=True)
class Queue:
    url: str
    arn: str


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    value: str


# --- SQS ---------------------------------------------------------------------


def ensure_queue(sqs: Any, name: str, attributes: dict[str, Any]) -> tuple[Queue, Outcome]:
    """Create the queue, or bring its changeable attributes to ``attributes``."""
    wanted = {key: _sqs_value(value) for key, value in attributes.items()}
    url = _queue_url(sqs, name)
    if url is None:
        url = sqs.create_queue(QueueName=name, Attributes=wanted)["QueueUrl"]
        return Queue(url, _queue_arn(sqs, url)), Outcome("created", f"queue {name}")
    current = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    differing = {
        key: value
        for key, value in wanted.items()
        if key not in CREATE_ONLY_ATTRIBUTES and not _same_attribute(current.get(key), value)
    }
    if not differing:
        return Queue(url, current["QueueArn"]), Outcome("unchanged", f"queue {name}")
    sqs.set_queue_attributes(QueueUrl=url, Attributes=differing)
    return Queue(url, current["QueueArn"]), Outcome(
        "updated", f"queue {name} ({', '.join(sorted(differing))})"
    )


def ensure_queues(sqs: Any, settings: StageSettings) -> list[Outcome]:
    """The DLQ first: the main queue's RedrivePolicy needs its ARN."""
    dlq, dlq_outcome = ensure_queue(sqs, settings.dlq_name, settings.dlq_attributes())
    _, queue_outcome = ensure_queue(
        sqs,
        settings.queue_name,
        settings.queue_attributes() | redrive_policy(dlq.arn, settings.max_receive_count),
    )
    return [dlq_outcome, queue_outcome]


def redrive_policy(dlq_arn: str, max_receive_count: int) -> dict[str, str]:
    """The main queue's RedrivePolicy attribute, pointing at the DLQ."""
    return {
        "RedrivePolicy": json.dumps(
            {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receive_count}
        )
    }


def delete_queue(sqs: Any, name: str) -> Outcome:
    url = _queue_url(sqs, name)
    if url is None:
        return Outcome("absent", f"queue {name}")
    sqs.delete_queue(QueueUrl=url)
    return Outcome("deleted", f"queue {name}")


def _queue_url(sqs: Any, name: str) -> str | None:
    try:
        return sqs.get_queue_url(QueueName=name)["QueueUrl"]
    except sqs.exceptions.QueueDoesNotExist:
        return None


def _queue_arn(sqs: Any, url: str) -> str:
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]


def _sqs_value(value: Any) -> str:
    """The SQS API speaks strings only: ``true``, ``360``, JSON text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _same_attribute(current: str | None, wanted: str) -> bool:
    """Compare JSON attributes (RedrivePolicy) by meaning, others as text.

    SQS may return a number in a JSON attribute as a string (``"5"``), so
    the fields are compared as text.
    """
    if current == wanted:
        return True
    if current is None or not wanted.startswith("{"):
        return False
    return _as_text(json.loads(current)) == _as_text(json.loads(wanted))


def _as_text(fields: dict[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in fields.items()}


# --- API key and usage plan --------------------------------------------------


def ensure_key_and_plan(
    apigw: Any, settings: StageSettings, rest_api_id: str
) -> tuple[ApiKey, list[Outcome]]:
    """The stage's key, its usage plan on the deployed API stage, and the binding."""
    key, key_outcome = ensure_api_key(apigw, settings.api_key_prefix)
    quota = settings.quota
    plan_id, plan_outcome = ensure_usage_plan(
        apigw,
        settings.resource_prefix,
        (rest_api_id, settings.api_gateway_stage),
        throttle={
            "rateLimit": settings.throttle.rate_limit,
            "burstLimit": settings.throttle.burst_limit,
        },
        quota={"limit": quota.limit, "period": quota.period} if quota else None,
    )
    return key, [key_outcome, plan_outcome, ensure_usage_plan_key(apigw, plan_id, key)]


def ensure_api_key(apigw: Any, prefix: str) -> tuple[ApiKey, Outcome]:
    """The stage's current key (the highest ``<prefix>N``), made if none is."""
    keys = _api_keys(apigw, prefix)
    if keys:
        return keys[-1], Outcome("unchanged", f"API key {keys[-1].name}")
    key = _create_api_key(apigw, f"{prefix}1")
    return key, Outcome("created", f"API key {key.name}")


def rotate_api_key(apigw: Any, prefix: str, usage_plan_id: str) -> tuple[ApiKey, Outcome]:
    """Add ``<prefix>N+1`` to the plan; older keys keep working until retired.

    Both keys are valid at once so the flespi stream can be switched without
    a window in which its requests are refused.
    """
    keys = _api_keys(apigw, prefix)
    number = _key_number(keys[-1].name, prefix) + 1 if keys else 1
    key = _create_api_key(apigw, f"{prefix}{number}")
    apigw.create_usage_plan_key(usagePlanId=usage_plan_id, keyId=key.id, keyType="API_KEY")
    return key, Outcome("created", f"API key {key.name}")


def retire_api_keys(apigw: Any, prefix: str) -> list[Outcome]:
    """Delete every key of the stage but the current one (after a rotation)."""
    return [_delete_api_key(apigw, key) for key in _api_keys(apigw, prefix)[:-1]]


def delete_api_keys(apigw: Any, prefix: str) -> list[Outcome]:
    keys = _api_keys(apigw, prefix)
    if not keys:
        return [Outcome("absent", f"API keys {prefix}*")]
    return [_delete_api_key(apigw, key) for key in keys]


def ensure_usage_plan(
    apigw: Any,
    name: str,
    api_stage: tuple[str, str],
    throttle: dict[str, float],
    quota: dict[str, Any] | None,
) -> tuple[str, Outcome]:
    """A plan bound to exactly this API stage, with this throttle and quota.

    ``api_stage`` is (rest_api_id, stage). Bindings to other APIs are dropped:
    they are left over from an API that Chalice replaced.
    """
    plan = find_usage_plan(apigw, name)
    stage_binding = {"apiId": api_stage[0], "stage": api_stage[1]}
    if plan is None:
        arguments: dict[str, Any] = {
            "name": name,
            "description": "flespi ingest: throttle and quota for the stream's API key",
            "apiStages": [stage_binding],
            "throttle": throttle,
        }
        if quota:
            arguments["quota"] = quota
        plan_id = apigw.create_usage_plan(**arguments)["id"]
        return plan_id, Outcome("created", f"usage plan {name}")
    operations = list(_usage_plan_patch(plan, stage_binding, throttle, quota))
    if not operations:
        return plan["id"], Outcome("unchanged", f"usage plan {name}")
    apigw.update_usage_plan(usagePlanId=plan["id"], patchOperations=operations)
    paths = sorted({op["path"].split("/")[1] for op in operations})
    return plan["id"], Outcome("updated", f"usage plan {name} ({', '.join(paths)})")


def ensure_usage_plan_key(apigw: Any, usage_plan_id: str, key: ApiKey) -> Outcome:
    bound = {item["id"] for item in _pages(apigw, "get_usage_plan_keys", usagePlanId=usage_plan_id)}
    if key.id in bound:
        return Outcome("unchanged", f"key {key.name} in usage plan")
    apigw.create_usage_plan_key(usagePlanId=usage_plan_id, keyId=key.id, keyType="API_KEY")
    return Outcome("created", f"key {key.name} in usage plan")


def delete_usage_plan(apigw: Any, name: str) -> Outcome:
    """Unbind keys and stages first: API Gateway refuses to drop a bound plan."""
    plan = find_usage_plan(apigw, name)
    if plan is None:
        return Outcome("absent", f"usage plan {name}")
    for item in _pages(apigw, "get_usage_plan_keys", usagePlanId=plan["id"]):
        apigw.delete_usage_plan_key(usagePlanId=plan["id"], keyId=item["id"])
    stages = [_remove_stage(binding) for binding in plan.get("apiStages", [])]
    if stages:
        apigw.update_usage_plan(usagePlanId=plan["id"], patchOperations=stages)
    apigw.delete_usage_plan(usagePlanId=plan["id"])
    return Outcome("deleted", f"usage plan {name}")


def _usage_plan_patch(
    plan: dict[str, Any],
    stage_binding: dict[str, str],
    throttle: dict[str, float],
    quota: dict[str, Any] | None,
) -> Iterator[dict[str, str]]:
    """The patch operations that turn ``plan`` into the wanted one."""
    bindings = [
        {"apiId": b["apiId"], "stage": b["stage"]} for b in plan.get("apiStages", [])
    ]
    for binding in bindings:
        if binding != stage_binding:
            yield _remove_stage(binding)
    if stage_binding not in bindings:
        yield {
            "op": "add",
            "path": "/apiStages",
            "value": f"{stage_binding['apiId']}:{stage_binding['stage']}",
        }
    yield from _replace_fields("throttle", plan.get("throttle", {}), throttle)
    if quota:
        yield from _replace_fields("quota", plan.get("quota", {}), quota)
    elif plan.get("quota"):
        yield {"op": "remove", "path": "/quota"}


def _replace_fields(
    section: str, current: dict[str, Any], wanted: dict[str, Any]
) -> Iterator[dict[str, str]]:
    for field, value in wanted.items():
        if current.get(field) != value:
            yield {"op": "replace", "path": f"/{section}/{field}", "value": str(value)}


def _remove_stage(binding: dict[str, str]) -> dict[str, str]:
    return {"op": "remove", "path": "/apiStages", "value": f"{binding['apiId']}:{binding['stage']}"}


def find_usage_plan(apigw: Any, name: str) -> dict[str, Any] | None:
    """The usage plan called ``name`` (names are not unique; we keep them so)."""
    return next((p for p in _pages(apigw, "get_usage_plans") if p.get("name") == name), None)


def _api_keys(apigw: Any, prefix: str) -> list[ApiKey]:
    """The stage's keys, oldest first (by the number after the prefix)."""
    keys = [
        ApiKey(id=item["id"], name=item["name"], value=item["value"])
        for item in _pages(apigw, "get_api_keys", nameQuery=prefix, includeValues=True)
        if _key_number(item.get("name", ""), prefix) > 0
    ]
    return sorted(keys, key=lambda key: _key_number(key.name, prefix))


def _key_number(name: str, prefix: str) -> int:
    """N of ``<prefix>N``; 0 for any other name (``nameQuery`` is a prefix match)."""
    suffix = name.removeprefix(prefix)
    return int(suffix) if name.startswith(prefix) and suffix.isdigit() else 0


def _create_api_key(apigw: Any, name: str) -> ApiKey:
    item = apigw.create_api_key(
        name=name, description="x-api-key of the flespi HTTP stream", enabled=True
    )
    return ApiKey(id=item["id"], name=item["name"], value=item["value"])


def _delete_api_key(apigw: Any, key: ApiKey) -> Outcome:
    apigw.delete_api_key(apiKey=key.id)
    return Outcome("deleted", f"API key {key.name}")


def _pages(client: Any, operation: str, **arguments: Any) -> Iterator[dict[str, Any]]:
    for page in client.get_paginator(operation).paginate(**arguments):
        yield from page["items"]


# --- source-IP allow-list ----------------------------------------------------


def ensure_source_ip_policy(
    apigw: Any, rest_api_id: str, stage: str, cidrs: tuple[str, ...]
) -> Outcome:
    """Set (or clear, for no CIDRs) the API's resource policy and redeploy.

    A resource policy only takes effect in a new deployment of the stage.
    """
    live = allowed_cidrs(apigw.get_rest_api(restApiId=rest_api_id).get("policy"))
    if live is not None and sorted(live) == sorted(cidrs):
        state = ", ".join(cidrs) if cidrs else "off"
        return Outcome("unchanged", f"source-IP allow-list ({state})")
    policy = json.dumps(source_ip_policy(cidrs)) if cidrs else ""
    apigw.update_rest_api(
        restApiId=rest_api_id,
        patchOperations=[{"op": "replace", "path": "/policy", "value": policy}],
    )
    apigw.create_deployment(
        restApiId=rest_api_id, stageName=stage, description="source-IP allow-list changed"
    )
    state = ", ".join(cidrs) if cidrs else "removed"
    return Outcome("updated", f"source-IP allow-list ({state}), stage {stage} redeployed")


# --- SQS trigger -------------------------------------------------------------


def ensure_batch_item_failures(lambda_: Any, event_uuid: str) -> Outcome:
    """Let ``consume`` fail single records instead of the whole batch.

    Chalice cannot set ``FunctionResponseTypes`` (chalice#2029); without it
    Lambda ignores the handler's ``batchItemFailures`` and retries every
    record of a batch with one bad message.
    """
    mapping = lambda_.get_event_source_mapping(UUID=event_uuid)
    subject = f"ReportBatchItemFailures on trigger {event_uuid}"
    if BATCH_ITEM_FAILURES in (mapping.get("FunctionResponseTypes") or []):
        return Outcome("unchanged", subject)
    lambda_.update_event_source_mapping(
        UUID=event_uuid, FunctionResponseTypes=[BATCH_ITEM_FAILURES]
    )
    return Outcome("updated", subject)
