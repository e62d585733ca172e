"""The command sequence of ``make deploy`` / ``make destroy`` (tools.deploy).

The one process boundary, the ``chalice`` command, is replaced by a stand-in
that does to the moto server what ``chalice deploy`` / ``chalice delete``
would do to AWS and records what it was asked; every step around it runs for
real against moto. Each test works in a copy of ``.chalice`` with its own
queue name, so it never touches the project's files or other tests' queues.
"""
from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

import pytest

from test_provision import REGION, clients, consume_trigger, create_rest_api  # noqa: F401
from tools import deploy
from tools.deploy_config import DeployConfigError

ROOT = Path(__file__).resolve().parent.parent


class FakeChalice:
    """Stands in for the ``chalice`` process: does its AWS work on moto."""

    def __init__(self, clients, status: int = 0) -> None:
        self.clients, self.status, self.commands = clients, status, []

    def __call__(self, command: list[str], cwd: Path, env: dict[str, str]) -> int:
        self.commands.append([Path(command[0]).name, *command[1:]])
        if self.status:
            return self.status
        stage = command[command.index("--stage") + 1]
        record = cwd / ".chalice" / "deployed" / f"{stage}.json"
        if command[1] == "deploy" and not record.exists():
            self._deploy(cwd, record)
        elif command[1] == "delete":
            self._delete(record)
        return 0

    def _deploy(self, project: Path, record: Path) -> None:
        queue = json.loads((project / ".chalice" / "config.json").read_text())["stages"]["dev"][
            "environment_variables"
        ]["QUEUE_NAME"]
        # Like Chalice, subscribing consume fails if the queue is not there yet.
        api_id = create_rest_api(self.clients["apigateway"])
        trigger = consume_trigger(self.clients, queue)
        record.parent.mkdir(exist_ok=True)
        record.write_text(
            json.dumps(
                {
                    "schema_version": "2.0",
                    "backend": "api",
                    "resources": [
                        {"name": "consume-sqs-event-source", "resource_type": "sqs_event",
                         "queue": queue, "event_uuid": trigger},
                        {"name": "rest_api", "resource_type": "rest_api", "rest_api_id": api_id,
                         "rest_api_url":
                             f"https://{api_id}.execute-api.{REGION}.amazonaws.com/api/"},
                    ],
                }
            )
        )

    def _delete(self, record: Path) -> None:
        resources = {r["resource_type"]: r for r in json.loads(record.read_text())["resources"]}
        self.clients["apigateway"].delete_rest_api(restApiId=resources["rest_api"]["rest_api_id"])
        self.clients["lambda"].delete_event_source_mapping(UUID=resources["sqs_event"]["event_uuid"])
        record.unlink()


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A copy of the project's stage settings with a queue of its own."""
    chalice_dir = tmp_path / ".chalice"
    chalice_dir.mkdir()
    shutil.copy(ROOT / ".chalice" / "deploy.json", chalice_dir)
    config = json.loads((ROOT / ".chalice" / "config.json").read_text())
    tag = uuid.uuid4().hex[:8]
    config["app_name"] = f"flespi-sqs-{tag}"
    config["stages"]["dev"]["environment_variables"]["QUEUE_NAME"] = f"flespi-{tag}"
    (chalice_dir / "config.json").write_text(json.dumps(config))
    return tmp_path


def queue_names(project: Path) -> list[str]:
    queue = json.loads((project / ".chalice" / "config.json").read_text())["stages"]["dev"][
        "environment_variables"
    ]["QUEUE_NAME"]
    return [queue, f"{queue}-dlq"]


def existing_queues(sqs, names: list[str]) -> list[str]:
    urls = sqs.list_queues(QueueNamePrefix=names[0]).get("QueueUrls", [])
    return sorted(name for name in names if any(url.endswith(f"/{name}") for url in urls))


def test_deploy_order_outcomes_and_stream_settings(project, clients):
    chalice, lines = FakeChalice(clients), []

    stream = deploy.deploy(project, "dev", run=chalice, say=lines.append)

    assert chalice.commands == [["chalice", "deploy", "--stage", "dev"]]
    headings = [line for line in lines if line.startswith("[")]
    assert headings == [
        "[1/6] IAM policy files",
        "[2/6] SQS queue and dead-letter queue",
        "[3/6] chalice deploy --stage dev",
        "[4/6] API key and usage plan",
        "[5/6] source-IP allow-list",
        "[6/6] consumer trigger",
    ]
    record = json.loads((project / ".chalice" / "deployed" / "dev.json").read_text())
    api_id = next(r["rest_api_id"] for r in record["resources"] if "rest_api_id" in r)
    assert stream.uri == f"https://{api_id}.execute-api.{REGION}.amazonaws.com/api/flespi"
    keys = clients["apigateway"].get_api_keys(includeValues=True)["items"]
    assert stream.api_key in {k["value"] for k in keys}
    block = lines[-1]
    assert f"URI             {stream.uri}" in block
    assert f"x-api-key: {stream.api_key}" in block
    assert "limit_messages" in block and "6 MB" in block and "2,000 messages of ~1 KB" in block
    assert "rotate-key --stage dev" in block
    trigger = next(r["event_uuid"] for r in record["resources"] if "event_uuid" in r)
    mapping = clients["lambda"].get_event_source_mapping(UUID=trigger)
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    policy = json.loads((project / ".chalice" / "policy-dev-api_handler.json").read_text())
    assert policy["Statement"][0]["Resource"].endswith(f":{queue_names(project)[0]}")


def test_second_deploy_reports_nothing_changed(project, clients):
    chalice = FakeChalice(clients)
    first = deploy.deploy(project, "dev", run=chalice, say=lambda line: None)
    lines: list[str] = []

    second = deploy.deploy(project, "dev", run=chalice, say=lines.append)

    results = [line.split()[0] for line in lines if re.match(r" {6}\w", line)]
    assert results and set(results) == {"unchanged"}
    assert second == first


def test_failed_chalice_deploy_stops_before_binding_anything(project, clients):
    chalice = FakeChalice(clients, status=2)

    with pytest.raises(deploy.DeployError, match=r"`chalice deploy` failed \(exit 2\); see above"):
        deploy.deploy(project, "dev", run=chalice, say=lambda line: None)

    assert existing_queues(clients["sqs"], queue_names(project)) == sorted(queue_names(project))
    prefix = json.loads((project / ".chalice" / "config.json").read_text())["app_name"]
    assert clients["apigateway"].get_api_keys(nameQuery=prefix)["items"] == []


def test_no_credentials_is_said_plainly_before_any_change(project, clients, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    chalice = FakeChalice(clients)

    with pytest.raises(deploy.DeployError, match="no AWS credentials found.*Nothing was changed"):
        deploy.deploy(project, "dev", run=chalice, say=lambda line: None)

    assert chalice.commands == []
    assert existing_queues(clients["sqs"], queue_names(project)) == []


def test_destroy_keeps_queues_unless_asked(project, clients):
    chalice = FakeChalice(clients)
    deploy.deploy(project, "dev", run=chalice, say=lambda line: None)
    lines: list[str] = []

    deploy.destroy(project, "dev", run=chalice, say=lines.append)

    assert chalice.commands[-1] == ["chalice", "delete", "--stage", "dev"]
    assert any(line.strip().startswith("kept") for line in lines)
    assert existing_queues(clients["sqs"], queue_names(project)) == sorted(queue_names(project))
    prefix = json.loads((project / ".chalice" / "config.json").read_text())["app_name"]
    assert clients["apigateway"].get_api_keys(nameQuery=prefix)["items"] == []

    deploy.destroy(project, "dev", delete_queues=True, run=chalice, say=lines.append)

    assert len(chalice.commands) == 2  # nothing left for chalice to delete
    assert existing_queues(clients["sqs"], queue_names(project)) == []


def test_unwired_policy_file_is_refused_with_the_fix(project, clients):
    path = project / ".chalice" / "config.json"
    config = json.loads(path.read_text())
    del config["stages"]["dev"]["lambda_functions"]
    path.write_text(json.dumps(config))
    chalice = FakeChalice(clients)

    with pytest.raises(deploy.DeployError, match='"iam_policy_file": "policy-dev-consume.json"'):
        deploy.deploy(project, "dev", run=chalice, say=lambda line: None)
    assert chalice.commands == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"source_ips": ["185.213.2.1/24"]}, "has host bits set"),
        ({"quota": {"limit": 10, "period": "YEAR"}}, "period in"),
        ({"max_receive_count": 0}, "max_receive_count must be an integer in 1..1000"),
        ({"throttel": {}}, r"unknown setting\(s\) \['throttel'\]"),
    ],
)
def test_bad_deploy_settings_are_named(project, settings, message):
    path = project / ".chalice" / "deploy.json"
    path.write_text(json.dumps({"stages": {"dev": settings}}))

    with pytest.raises(DeployConfigError, match=message):
        deploy.deploy(project, "dev", run=FakeChalice(None), say=lambda line: None)


def test_cli_names_an_unknown_stage(capsys):
    assert deploy.main(["deploy", "--stage", "staging"]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: stage 'staging' is not in .chalice/config.json (stages: dev, prod)"
    )


def test_stage_without_usage_plan_cannot_rotate(project, clients):
    with pytest.raises(deploy.DeployError, match="run `make deploy` first"):
        deploy.rotate_key(project, "dev", say=lambda line: None)

