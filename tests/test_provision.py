"""The deploy steps of tools.provision against a moto server on loopback.

moto cannot import Chalice's Swagger API, so what ``chalice deploy`` would
make (REST API with its stage, the consume function and its SQS trigger) is
created here directly; the steps around it run unchanged. Every test uses its
own names, since the moto server is shared by the whole session.
"""
from __future__ import annotations

import io
import json
import uuid
import zipfile
from dataclasses import replace

import boto3
import pytest

from tools import provision
from tools.deploy_config import Quota, StageSettings, Throttle

REGION = "us-east-1"


def make_settings(**changes) -> StageSettings:
    """A stage with names nobody else on the shared moto server uses."""
    tag = uuid.uuid4().hex[:8]
    settings = StageSettings(
        app_name=f"flespi-sqs-{tag}",
        stage="dev",
        api_gateway_stage="api",
        queue_name=f"flespi-{tag}",
        consume_timeout=60,
        max_receive_count=5,
        retention_seconds=345_600,
        dlq_retention_seconds=1_209_600,
        throttle=Throttle(rate_limit=5, burst_limit=10),
        quota=Quota(limit=50_000, period="DAY"),
        source_ips=(),
    )
    return replace(settings, **changes)


@pytest.fixture()
def clients(moto_server):
    return {
        name: boto3.client(name, endpoint_url=moto_server, region_name=REGION)
        for name in ("sqs", "apigateway", "lambda", "iam")
    }


def create_rest_api(apigw) -> str:
    """A REST API with one method and a deployed ``api`` stage, as Chalice leaves it."""
    api_id = apigw.create_rest_api(name=f"flespi-sqs-{uuid.uuid4().hex[:8]}")["id"]
    root = apigw.get_resources(restApiId=api_id)["items"][0]["id"]
    resource = apigw.create_resource(restApiId=api_id, parentId=root, pathPart="flespi")["id"]
    apigw.put_method(
        restApiId=api_id,
        resourceId=resource,
        httpMethod="POST",
        authorizationType="NONE",
        apiKeyRequired=True,
    )
    apigw.put_integration(restApiId=api_id, resourceId=resource, httpMethod="POST", type="MOCK")
    apigw.create_deployment(restApiId=api_id, stageName="api")
    return api_id


@pytest.fixture()
def rest_api(clients) -> str:
    return create_rest_api(clients["apigateway"])


def consume_trigger(clients, queue_name: str) -> str:
    """A function subscribed to the queue, as ``chalice deploy`` subscribes consume."""
    role = clients["iam"].create_role(
        RoleName=f"consume-{uuid.uuid4().hex[:8]}",
        AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": []}),
    )["Role"]["Arn"]
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as archive:
        archive.writestr("app.py", "def consume(event, context):\n    return {}\n")
    function = clients["lambda"].create_function(
        FunctionName=f"{queue_name}-consume",
        Runtime="python3.11",
        Role=role,
        Handler="app.consume",
        Code={"ZipFile": code.getvalue()},
    )["FunctionArn"]
    sqs = clients["sqs"]
    url = sqs.get_queue_url(QueueName=queue_name)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    return clients["lambda"].create_event_source_mapping(
        EventSourceArn=arn, FunctionName=function, BatchSize=10
    )["UUID"]


def deploy_steps(clients, settings: StageSettings, api_id: str, trigger: str | None = None):
    """What ``make deploy`` runs around ``chalice deploy``, in its order."""
    outcomes = provision.ensure_queues(clients["sqs"], settings)
    key, key_outcomes = provision.ensure_key_and_plan(clients["apigateway"], settings, api_id)
    outcomes += key_outcomes
    outcomes.append(
        provision.ensure_source_ip_policy(
            clients["apigateway"], api_id, settings.api_gateway_stage, settings.source_ips
        )
    )
    if trigger:
        outcomes.append(provision.ensure_batch_item_failures(clients["lambda"], trigger))
    return key, outcomes


def describe(clients, settings: StageSettings, api_id: str, trigger: str) -> dict:
    """Everything the steps touch, as AWS would describe it."""
    sqs, apigw = clients["sqs"], clients["apigateway"]
    plan = provision.find_usage_plan(apigw, settings.resource_prefix)
    return {
        "queues": {
            name: sqs.get_queue_attributes(
                QueueUrl=sqs.get_queue_url(QueueName=name)["QueueUrl"], AttributeNames=["All"]
            )["Attributes"]
            for name in (settings.queue_name, settings.dlq_name)
        },
        "keys": apigw.get_api_keys(nameQuery=settings.api_key_prefix, includeValues=True)["items"],
        "plan": plan,
        "plan_keys": apigw.get_usage_plan_keys(usagePlanId=plan["id"])["items"],
        "policy": apigw.get_rest_api(restApiId=api_id).get("policy"),
        "deployments": len(apigw.get_deployments(restApiId=api_id)["items"]),
        "trigger": {
            field: value
            for field, value in clients["lambda"].get_event_source_mapping(UUID=trigger).items()
            if field != "ResponseMetadata"
        },
    }


def test_queue_and_dlq_have_redrive_retention_and_visibility(clients):
    settings = make_settings(consume_timeout=45, max_receive_count=3)
    outcomes = provision.ensure_queues(clients["sqs"], settings)

    assert [str(o) for o in outcomes] == [
        f"created   queue {settings.dlq_name}",
        f"created   queue {settings.queue_name}",
    ]
    sqs = clients["sqs"]
    main = sqs.get_queue_attributes(
        QueueUrl=sqs.get_queue_url(QueueName=settings.queue_name)["QueueUrl"],
        AttributeNames=["All"],
    )["Attributes"]
    dlq = sqs.get_queue_attributes(
        QueueUrl=sqs.get_queue_url(QueueName=settings.dlq_name)["QueueUrl"],
        AttributeNames=["All"],
    )["Attributes"]
    assert main["VisibilityTimeout"] == str(6 * 45)
    assert main["MessageRetentionPeriod"] == "345600"
    assert dlq["MessageRetentionPeriod"] == "1209600"
    assert json.loads(main["RedrivePolicy"]) == {
        "deadLetterTargetArn": dlq["QueueArn"],
        "maxReceiveCount": 3,
    }


def test_fifo_queue_gets_a_fifo_dlq(clients):
    settings = make_settings()
    settings = replace(settings, queue_name=f"{settings.queue_name}.fifo")
    provision.ensure_queues(clients["sqs"], settings)

    assert settings.dlq_name.endswith("-dlq.fifo")
    sqs = clients["sqs"]
    for name in (settings.queue_name, settings.dlq_name):
        attributes = sqs.get_queue_attributes(
            QueueUrl=sqs.get_queue_url(QueueName=name)["QueueUrl"], AttributeNames=["All"]
        )["Attributes"]
        assert attributes["FifoQueue"] == "true"
    again = provision.ensure_queues(sqs, settings)
    assert {o.action for o in again} == {"unchanged"}


def test_redrive_policy_with_a_quoted_count_counts_as_unchanged(clients):
    settings = make_settings()
    provision.ensure_queues(clients["sqs"], settings)
    sqs = clients["sqs"]
    url = sqs.get_queue_url(QueueName=settings.queue_name)["QueueUrl"]
    redrive = json.loads(
        sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])["Attributes"][
            "RedrivePolicy"
        ]
    )
    redrive["maxReceiveCount"] = str(redrive["maxReceiveCount"])  # as the console writes it
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"RedrivePolicy": json.dumps(redrive)})

    assert {o.action for o in provision.ensure_queues(sqs, settings)} == {"unchanged"}


def test_changed_settings_update_only_what_differs(clients):
    settings = make_settings()
    provision.ensure_queues(clients["sqs"], settings)
    changed = replace(settings, consume_timeout=120, max_receive_count=9)

    outcomes = provision.ensure_queues(clients["sqs"], changed)

    assert [str(o) for o in outcomes] == [
        f"unchanged queue {settings.dlq_name}",
        f"updated   queue {settings.queue_name} (RedrivePolicy, VisibilityTimeout)",
    ]


def test_key_and_usage_plan_are_bound_to_the_deployed_stage(clients, rest_api):
    settings = make_settings()
    apigw = clients["apigateway"]

    key, outcomes = provision.ensure_key_and_plan(apigw, settings, rest_api)

    assert [o.action for o in outcomes] == ["created", "created", "created"]
    assert key.name == f"{settings.api_key_prefix}1" and len(key.value) >= 20
    plan = provision.find_usage_plan(apigw, settings.resource_prefix)
    assert plan["apiStages"] == [{"apiId": rest_api, "stage": "api"}]
    assert plan["throttle"] == {"rateLimit": 5, "burstLimit": 10}
    assert plan["quota"]["limit"] == 50_000 and plan["quota"]["period"] == "DAY"
    bound = apigw.get_usage_plan_keys(usagePlanId=plan["id"])["items"]
    assert [(k["id"], k["type"]) for k in bound] == [(key.id, "API_KEY")]


def test_usage_plan_follows_a_replaced_api_and_new_limits(clients, rest_api):
    settings = make_settings()
    apigw = clients["apigateway"]
    provision.ensure_key_and_plan(apigw, settings, "gone-api")
    changed = replace(settings, throttle=Throttle(rate_limit=50, burst_limit=100), quota=None)

    _, outcomes = provision.ensure_key_and_plan(apigw, changed, rest_api)

    assert str(outcomes[1]) == f"updated   usage plan {settings.resource_prefix} (apiStages, quota, throttle)"
    plan = provision.find_usage_plan(apigw, settings.resource_prefix)
    assert plan["apiStages"] == [{"apiId": rest_api, "stage": "api"}]
    assert plan["throttle"] == {"rateLimit": 50, "burstLimit": 100}
    assert not plan.get("quota")


def test_source_ip_allow_list_is_set_redeployed_and_removed(clients, rest_api):
    apigw = clients["apigateway"]
    deployments = lambda: len(apigw.get_deployments(restApiId=rest_api)["items"])  # noqa: E731
    before = deployments()

    assert provision.ensure_source_ip_policy(apigw, rest_api, "api", ()).action == "unchanged"
    set_ = provision.ensure_source_ip_policy(apigw, rest_api, "api", ("185.213.2.0/24",))
    policy = json.loads(apigw.get_rest_api(restApiId=rest_api)["policy"])
    again = provision.ensure_source_ip_policy(apigw, rest_api, "api", ("185.213.2.0/24",))
    removed = provision.ensure_source_ip_policy(apigw, rest_api, "api", ())

    assert set_.action == "updated" and again.action == "unchanged"
    deny = policy["Statement"][1]
    assert deny["Effect"] == "Deny"
    assert deny["Condition"] == {"NotIpAddress": {"aws:SourceIp": ["185.213.2.0/24"]}}
    assert removed.action == "updated"
    assert not apigw.get_rest_api(restApiId=rest_api).get("policy")
    assert deployments() == before + 2  # a policy acts only once the stage is redeployed


def test_report_batch_item_failures_is_switched_on_once(clients):
    settings = make_settings()
    provision.ensure_queues(clients["sqs"], settings)
    trigger = consume_trigger(clients, settings.queue_name)

    first = provision.ensure_batch_item_failures(clients["lambda"], trigger)
    second = provision.ensure_batch_item_failures(clients["lambda"], trigger)

    assert (first.action, second.action) == ("updated", "unchanged")
    mapping = clients["lambda"].get_event_source_mapping(UUID=trigger)
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]


def test_second_run_changes_nothing(clients, rest_api):
    settings = make_settings(source_ips=("185.213.2.0/24",))
    provision.ensure_queues(clients["sqs"], settings)
    trigger = consume_trigger(clients, settings.queue_name)
    first_key, first = deploy_steps(clients, settings, rest_api, trigger)
    before = describe(clients, settings, rest_api, trigger)

    second_key, second = deploy_steps(clients, settings, rest_api, trigger)

    assert any(o.changed for o in first)
    assert [o.action for o in second] == ["unchanged"] * len(second)
    assert describe(clients, settings, rest_api, trigger) == before
    assert second_key == first_key


def test_rotation_keeps_the_old_key_until_retired(clients, rest_api):
    settings = make_settings()
    apigw = clients["apigateway"]
    old, _ = provision.ensure_key_and_plan(apigw, settings, rest_api)
    plan_id = provision.find_usage_plan(apigw, settings.resource_prefix)["id"]

    new, outcome = provision.rotate_api_key(apigw, settings.api_key_prefix, plan_id)
    bound = {k["id"] for k in apigw.get_usage_plan_keys(usagePlanId=plan_id)["items"]}
    current, _ = provision.ensure_key_and_plan(apigw, settings, rest_api)
    retired = provision.retire_api_keys(apigw, settings.api_key_prefix)

    assert new.name == f"{settings.api_key_prefix}2" and new.value != old.value
    assert bound == {old.id, new.id}
    assert current == new  # deploy prints the newest key from now on
    assert [str(o) for o in retired] == [f"deleted   API key {old.name}"]
    remaining = apigw.get_api_keys(nameQuery=settings.api_key_prefix)["items"]
    assert [k["id"] for k in remaining] == [new.id]


def test_destroy_removes_plan_keys_and_queues_and_is_repeatable(clients, rest_api):
    settings = make_settings()
    sqs, apigw = clients["sqs"], clients["apigateway"]
    deploy_steps(clients, settings, rest_api)

    def destroy() -> list[str]:
        return [
            provision.delete_usage_plan(apigw, settings.resource_prefix).action,
            *(o.action for o in provision.delete_api_keys(apigw, settings.api_key_prefix)),
            provision.delete_queue(sqs, settings.queue_name).action,
            provision.delete_queue(sqs, settings.dlq_name).action,
        ]

    assert destroy() == ["deleted"] * 4
    assert destroy() == ["absent"] * 4
    assert provision.find_usage_plan(apigw, settings.resource_prefix) is None
    assert apigw.get_api_keys(nameQuery=settings.api_key_prefix)["items"] == []


def test_keys_of_other_stages_and_names_are_left_alone(clients, rest_api):
    settings = make_settings()
    apigw = clients["apigateway"]
    foreign = [
        apigw.create_api_key(name=f"{settings.api_key_prefix}old", enabled=True)["id"],
        apigw.create_api_key(name=f"{settings.resource_prefix}x-key-1", enabled=True)["id"],
    ]
    key, _ = provision.ensure_key_and_plan(apigw, settings, rest_api)

    provision.delete_api_keys(apigw, settings.api_key_prefix)

    assert key.id not in foreign
    left = {k["id"] for k in apigw.get_api_keys(nameQuery=settings.resource_prefix)["items"]}
    assert left == set(foreign)
