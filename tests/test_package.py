"""``make package``: the real ``chalice package --merge-template`` and cfn-lint.

The slow tests build a copy of the project in a temporary directory exactly
as ``make package`` does (Chalice fetches the Lambda wheel of orjson from
PyPI), lint it, and check that the template holds what the deploy issue
asks for. The fast ones check the committed IAM policy files.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from tools import deploy, deploy_config, policies

ROOT = Path(__file__).resolve().parent.parent
CONFIG = json.loads((ROOT / ".chalice" / "config.json").read_text())


def sqs_statements(policy: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for statement in policy["Statement"]:
        actions = statement["Action"]
        actions = [actions] if isinstance(actions, str) else actions
        if any(action.startswith("sqs:") for action in actions):
            yield statement | {"Action": actions}


def assert_least_privilege(statement: dict[str, Any]) -> None:
    resources = statement["Resource"]
    for resource in resources if isinstance(resources, list) else [resources]:
        assert resource != "*", statement
        assert not (isinstance(resource, str) and resource.endswith(":*")), statement
    assert "sqs:*" not in statement["Action"] and "*" not in statement["Action"], statement


@pytest.mark.parametrize("stage", sorted(CONFIG["stages"]))
def test_committed_policy_files_are_current_and_wired(stage):
    settings = deploy_config.load(ROOT, stage)

    assert policies.missing_policy_wiring(CONFIG, stage) == []
    for function in policies.QUEUE_ACTIONS:
        path = ROOT / ".chalice" / policies.policy_file_name(stage, function)
        committed = json.loads(path.read_text())
        assert committed == policies.file_policy(settings, function), (
            f"{path.name} is stale: run `make package STAGE={stage}` and commit it"
        )
        for statement in sqs_statements(committed):
            assert_least_privilege(statement)
            assert statement["Resource"].endswith(f":sqs:*:*:{settings.queue_name}")


@pytest.fixture()
def project_copy(tmp_path: Path) -> Path:
    """What a fresh clone has that ``chalice package`` reads."""
    for name in ("app.py", "requirements.txt"):
        shutil.copy(ROOT / name, tmp_path)
    shutil.copytree(ROOT / "chalicelib", tmp_path / "chalicelib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / ".chalice").mkdir()
    for name in ("config.json", "deploy.json"):
        shutil.copy(ROOT / ".chalice" / name, tmp_path / ".chalice")
    return tmp_path


def package(project: Path, stage: str) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """Run the package step for real; return the template and each tool's exit."""
    statuses: list[tuple[str, int]] = []

    def run(command: list[str], cwd: Path, env: dict[str, str]) -> int:
        status = deploy.run_command(command, cwd, env)
        statuses.append((Path(command[0]).name, status))
        return status

    sam = deploy.package(project, stage, project / "dist" / stage, run=run, say=lambda line: None)
    return json.loads(sam.read_text()), statuses


@pytest.mark.slow
@pytest.mark.parametrize("stage, fifo", [("dev", False), ("prod", True)])
def test_package_template_passes_cfn_lint_and_holds_everything(project_copy, stage, fifo):
    if fifo:  # the same template, for a FIFO queue
        path = project_copy / ".chalice" / "config.json"
        config = json.loads(path.read_text())
        config["stages"][stage]["environment_variables"]["QUEUE_NAME"] = f"flespi-{stage}.fifo"
        path.write_text(json.dumps(config))
    settings = deploy_config.load(project_copy, stage)

    template, statuses = package(project_copy, stage)

    assert statuses == [("chalice", 0), ("cfn-lint", 0)]
    resources = template["Resources"]
    queue, dlq = resources["Queue"], resources["DeadLetterQueue"]
    assert queue["Type"] == dlq["Type"] == "AWS::SQS::Queue"
    assert queue["Properties"]["QueueName"] == settings.queue_name
    assert dlq["Properties"]["QueueName"] == settings.dlq_name
    assert queue["Properties"]["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]},
        "maxReceiveCount": settings.max_receive_count,
    }
    consume = resources["Consume"]["Properties"]
    assert queue["Properties"]["VisibilityTimeout"] >= 6 * consume["Timeout"]
    if fifo:
        assert queue["Properties"]["FifoQueue"] is dlq["Properties"]["FifoQueue"] is True

    event = consume["Events"]["ConsumeSqsEventSource"]
    assert event["Type"] == "SQS"
    assert event["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert event["Properties"]["Queue"]["Fn::Sub"].endswith(f":{settings.queue_name}")

    api_stage = resources["RestAPI"]["Properties"]["StageName"]
    assert resources["ApiKey"]["Type"] == "AWS::ApiGateway::ApiKey"
    plan = resources["UsagePlan"]
    assert plan["Type"] == "AWS::ApiGateway::UsagePlan"
    assert plan["Properties"]["ApiStages"] == [{"ApiId": {"Ref": "RestAPI"}, "Stage": api_stage}]
    assert plan["DependsOn"] == [f"RestAPI{api_stage}Stage"]  # SAM's name for the stage
    assert plan["Properties"]["Throttle"]["RateLimit"] == settings.throttle.rate_limit
    plan_key = resources["UsagePlanKey"]["Properties"]
    assert plan_key == {"KeyId": {"Ref": "ApiKey"}, "KeyType": "API_KEY",
                        "UsagePlanId": {"Ref": "UsagePlan"}}

    assert "/api/flespi" in template["Outputs"]["IngestURL"]["Value"]["Fn::Sub"]
    assert template["Outputs"]["ApiKeyId"]["Value"] == {"Ref": "ApiKey"}

    grants = {
        name: [s for p in r["Properties"]["Policies"] for s in sqs_statements(p["PolicyDocument"])]
        for name, r in resources.items()
        if r["Type"] == "AWS::IAM::Role"
    }
    assert set(grants) == {"ApiHandlerRole", "ConsumeRole"}
    for statements in grants.values():
        for statement in statements:
            assert_least_privilege(statement)
            assert statement["Resource"] == {"Fn::GetAtt": ["Queue", "Arn"]}
    assert [s["Action"] for s in grants["ApiHandlerRole"]] == [["sqs:GetQueueUrl", "sqs:SendMessage"]]

    api_policy = resources["RestAPI"]["Properties"]["DefinitionBody"].get(
        "x-amazon-apigateway-policy"
    )
    if settings.source_ips:
        deny = api_policy["Statement"][1]
        assert deny["Condition"]["NotIpAddress"]["aws:SourceIp"] == list(settings.source_ips)
    else:
        assert api_policy is None
