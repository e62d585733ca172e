"""Least-privilege IAM policies for the two functions, and the source-IP policy.

One generator serves both deploy paths: ``chalice deploy`` reads the policy
files written here (``iam_policy_file`` per function and stage in
``.chalice/config.json``), where the queue is named by an ARN with wildcard
region and account; the CloudFormation template passes the queue's exact
``Fn::GetAtt`` instead. Either way the API function may only send to its
queue, the consumer may only receive from it, and each writes only its own
log group.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tools.deploy_config import API_HANDLER, CONSUMER, StageSettings

#: What each function may do on its queue. No sqs:*, no Resource "*".
QUEUE_ACTIONS: dict[str, list[str]] = {
    # The sender resolves the queue URL once per container, then sends.
    API_HANDLER: ["sqs:GetQueueUrl", "sqs:SendMessage"],
    # What Lambda's SQS poller needs (it polls with the function's role).
    CONSUMER: ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"],
}
LOG_ACTIONS = ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"]
SOURCE_IP_SID = "DenyOutsideSourceIpAllowList"


def policy_file_name(stage: str, function: str) -> str:
    """Relative to ``.chalice/``, as Chalice's ``iam_policy_file`` expects."""
    return f"policy-{stage}-{function}.json"


def function_policy(function: str, queue_arn: Any, log_resources: list[Any]) -> dict[str, Any]:
    """The whole IAM policy of one function.

    ``queue_arn`` and ``log_resources`` (its log group and the group's
    streams) are ARN strings or CloudFormation intrinsics.
    """
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "OwnQueueOnly",
                "Effect": "Allow",
                "Action": QUEUE_ACTIONS[function],
                "Resource": queue_arn,
            },
            {
                "Sid": "OwnLogGroupOnly",
                "Effect": "Allow",
                "Action": LOG_ACTIONS,
                "Resource": log_resources,
            },
        ],
    }


def file_policy(settings: StageSettings, function: str) -> dict[str, Any]:
    """The policy for ``chalice deploy``: names exact, region/account wildcards.

    Wildcards keep the file valid for any account a user deploys to, while
    the queue and function names still pin it to this stage.
    """
    log_group = f"arn:*:logs:*:*:log-group:/aws/lambda/{settings.function_name(function)}"
    return function_policy(
        function,
        queue_arn=f"arn:*:sqs:*:*:{settings.queue_name}",
        log_resources=[log_group, f"{log_group}:*"],
    )


def write_policy_files(project_dir: Path, settings: StageSettings) -> list[Path]:
    """Bring the stage's policy files in line with the settings.

    Returns the files that had to change (empty when all were current), so a
    re-run is silent and a changed QUEUE_NAME cannot leave a stale grant.
    """
    changed = []
    for function in QUEUE_ACTIONS:
        path = project_dir / ".chalice" / policy_file_name(settings.stage, function)
        text = json.dumps(file_policy(settings, function), indent=2) + "\n"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    return changed


def missing_policy_wiring(chalice_config: dict[str, Any], stage: str) -> list[str]:
    """Functions whose stage config does not point at our policy file.

    Without that key Chalice silently falls back to ``policy-<stage>.json``,
    so deploy refuses to run instead of shipping a different policy.
    """
    functions = chalice_config["stages"][stage].get("lambda_functions", {})
    return [
        function
        for function in QUEUE_ACTIONS
        if functions.get(function, {}).get("iam_policy_file") != policy_file_name(stage, function)
    ]


def source_ip_policy(cidrs: tuple[str, ...]) -> dict[str, Any]:
    """API Gateway resource policy: invoke allowed, except from outside ``cidrs``.

    An explicit Deny wins over the Allow, so API Gateway refuses other
    addresses with 403 before Lambda runs (and before it counts against the
    usage plan).
    """
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": "execute-api:Invoke",
                "Resource": "execute-api:/*",
            },
            {
                "Sid": SOURCE_IP_SID,
                "Effect": "Deny",
                "Principal": "*",
                "Action": "execute-api:Invoke",
                "Resource": "execute-api:/*",
                "Condition": {"NotIpAddress": {"aws:SourceIp": list(cidrs)}},
            },
        ],
    }


def allowed_cidrs(policy_text: str | None) -> tuple[str, ...] | None:
    """The allow-list in a live API policy, ``()`` for none, None if not ours.

    API Gateway hands the policy back rewritten (escaped quotes, ARNs
    expanded), so idempotence compares meaning, not text.
    """
    if not policy_text:
        return ()
    try:
        policy = json.loads(policy_text)
    except ValueError:
        try:
            policy = json.loads(policy_text.replace('\\"', '"'))
        except ValueError:
            return None
    for statement in policy.get("Statement", []):
        if statement.get("Sid") == SOURCE_IP_SID:
            cidrs = statement["Condition"]["NotIpAddress"]["aws:SourceIp"]
            return tuple([cidrs] if isinstance(cidrs, str) else cidrs)
    return None
