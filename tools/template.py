"""The template merged into ``chalice package`` output (``--merge-template``).

Chalice's SAM template has the functions, their roles, the REST API and the
SQS trigger. This adds what Chalice cannot express: the queue and its DLQ,
the API key with its usage plan, ``ReportBatchItemFailures`` on the trigger,
the optional source-IP policy, and exact-ARN roles. Chalice deep-merges dicts
and replaces lists, which is what lets us swap whole role policies.

Logical ids below are Chalice's (``Consume``, ``ConsumeRole``, ``APIHandler``,
``ApiHandlerRole``, ``RestAPI``, the ``ConsumeSqsEventSource`` event) and
SAM's (``RestAPI<stage>Stage``, the stage resource the transform makes).
"""
from __future__ import annotations

from typing import Any

from tools.deploy_config import API_HANDLER, CONSUMER, StageSettings
from tools.policies import function_policy, source_ip_policy

#: Chalice's logical ids: function, its role, and its role policy name.
FUNCTION_IDS = {
    API_HANDLER: ("APIHandler", "ApiHandlerRole", "ApiHandlerRolePolicy"),
    CONSUMER: ("Consume", "ConsumeRole", "ConsumeRolePolicy"),
}
QUEUE_ARN = {"Fn::GetAtt": ["Queue", "Arn"]}


def merge_template(settings: StageSettings) -> dict[str, Any]:
    """Everything ``make package`` adds to Chalice's template for one stage."""
    resources: dict[str, Any] = {
        "DeadLetterQueue": _queue(settings.dlq_name, settings.dlq_attributes()),
        "Queue": _queue(
            settings.queue_name,
            settings.queue_attributes()
            | {
                "RedrivePolicy": {
                    "deadLetterTargetArn": {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]},
                    "maxReceiveCount": settings.max_receive_count,
                }
            },
        ),
        "ApiKey": {
            "Type": "AWS::ApiGateway::ApiKey",
            "Properties": {"Name": f"{settings.api_key_prefix}1", "Enabled": True},
        },
        "UsagePlan": _usage_plan(settings),
        "UsagePlanKey": {
            "Type": "AWS::ApiGateway::UsagePlanKey",
            "Properties": {
                "KeyId": {"Ref": "ApiKey"},
                "KeyType": "API_KEY",
                "UsagePlanId": {"Ref": "UsagePlan"},
            },
        },
        "Consume": {
            "Properties": {
                "Events": {
                    "ConsumeSqsEventSource": {
                        "Properties": {"FunctionResponseTypes": ["ReportBatchItemFailures"]}
                    }
                }
            }
        },
    }
    for function in FUNCTION_IDS:
        _pin_function(resources, settings, function)
    if settings.source_ips:
        resources["RestAPI"] = {
            "Properties": {
                "DefinitionBody": {
                    "x-amazon-apigateway-policy": source_ip_policy(settings.source_ips)
                }
            }
        }
    return {"Resources": resources, "Outputs": _outputs(settings)}


def _queue(name: str, attributes: dict[str, Any]) -> dict[str, Any]:
    return {"Type": "AWS::SQS::Queue", "Properties": {"QueueName": name} | attributes}


def _usage_plan(settings: StageSettings) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "UsagePlanName": settings.resource_prefix,
        "ApiStages": [{"ApiId": {"Ref": "RestAPI"}, "Stage": settings.api_gateway_stage}],
        "Throttle": {
            "RateLimit": settings.throttle.rate_limit,
            "BurstLimit": settings.throttle.burst_limit,
        },
    }
    if settings.quota:
        properties["Quota"] = {"Limit": settings.quota.limit, "Period": settings.quota.period}
    return {
        "Type": "AWS::ApiGateway::UsagePlan",
        # The stage is made by the SAM transform and nothing we write refers
        # to it, so without this CloudFormation may create the plan first and
        # fail with "Invalid stage identifier specified".
        "DependsOn": [f"RestAPI{settings.api_gateway_stage}Stage"],
        "Properties": properties,
    }


def _pin_function(resources: dict[str, Any], settings: StageSettings, function: str) -> None:
    """Give a function Chalice's deploy name and a role scoped to exact ARNs.

    The fixed name makes the log group known in advance; referring to the
    queue by ``GetAtt`` also orders the stack: queue, role, function, trigger.
    """
    function_id, role_id, policy_name = FUNCTION_IDS[function]
    name = settings.function_name(function)
    log_group = (
        "arn:${AWS::Partition}:logs:${AWS::Region}:${AWS::AccountId}"
        f":log-group:/aws/lambda/{name}"
    )
    resources.setdefault(function_id, {}).setdefault("Properties", {})["FunctionName"] = name
    resources[role_id] = {
        "Properties": {
            "Policies": [
                {
                    "PolicyName": policy_name,
                    "PolicyDocument": function_policy(
                        function,
                        QUEUE_ARN,
                        [{"Fn::Sub": log_group}, {"Fn::Sub": f"{log_group}:*"}],
                    ),
                }
            ]
        }
    }


def _outputs(settings: StageSettings) -> dict[str, Any]:
    return {
        "IngestURL": {
            "Description": "URI for the flespi HTTP stream",
            "Value": {
                "Fn::Sub": "https://${RestAPI}.execute-api.${AWS::Region}.${AWS::URLSuffix}"
                f"/{settings.api_gateway_stage}/flespi"
            },
        },
        "ApiKeyId": {
            "Description": "aws apigateway get-api-key --include-value --api-key <this>",
            "Value": {"Ref": "ApiKey"},
        },
        "QueueUrl": {"Value": {"Ref": "Queue"}},
        "DeadLetterQueueUrl": {"Value": {"Ref": "DeadLetterQueue"}},
    }
