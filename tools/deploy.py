"""``make package|deploy|destroy``: from zero to a live, protected flespi endpoint.

``chalice deploy`` ships the functions, the REST API and the SQS trigger; the
steps around it (``tools.provision``) add the queues, the API key and usage
plan, the source-IP policy and partial-batch failures, none of which Chalice
can do. Every step is idempotent, so re-running is how you apply a change.

    python -m tools.deploy package|deploy|destroy --stage dev [--delete-queues]
    python -m tools.deploy rotate-key|retire-keys --stage dev
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from tools import deploy_config, policies, provision, template
from tools.deploy_config import DeployConfigError, StageSettings

PROJECT_DIR = Path(__file__).resolve().parent.parent
#: How the messages tell a user to run this module (``make`` uses the venv).
SELF = ".venv/bin/python -m tools.deploy"
#: Lambda refuses request payloads over 6 MB; at ~1 KB per flespi message
#: this leaves room for size variance and JSON overhead.
SUGGESTED_LIMIT_MESSAGES = 2000

#: Runs one external command in a directory with an environment; returns
#: its exit status. Tests replace it to stand in for ``chalice``.
Runner = Callable[[list[str], Path, dict[str, str]], int]
Say = Callable[[str], None]


class DeployError(RuntimeError):
    """A step cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class Deployed:
    """What ``chalice deploy`` recorded in ``.chalice/deployed/<stage>.json``."""

    rest_api_id: str
    rest_api_url: str
    consume_event_uuid: str


@dataclass(frozen=True)
class StreamSettings:
    """What a flespi HTTP stream needs to send to this deployment."""

    uri: str
    api_key: str


def run_command(command: list[str], cwd: Path, env: dict[str, str]) -> int:
    """Run a command with its output going straight to the terminal."""
    return subprocess.run(command, cwd=cwd, env=env, check=False).returncode


def tool(name: str) -> str:
    """A console script of this interpreter's environment (``.venv/bin``)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise DeployError(f"{name} is not installed; run `make setup` first")
    return found


class Progress:
    """Numbered step headings and indented result lines."""

    def __init__(self, total: int, say: Say = print) -> None:
        self._total, self._done, self.say = total, 0, say

    def step(self, title: str) -> None:
        self._done += 1
        self.say(f"[{self._done}/{self._total}] {title}")

    def report(self, lines: Iterable[provision.Outcome | str]) -> None:
        for line in lines:
            self.say(f"      {line}")


# --- package -----------------------------------------------------------------


def package(
    project_dir: Path, stage: str, out_dir: Path, run: Runner = run_command, say: Say = print
) -> Path:
    """Write ``out_dir/sam.json`` (+ ``deployment.zip``) and lint it.

    Needs no AWS account; Chalice insists on a region, which does not end up
    in the template, so a missing one defaults to us-east-1.
    """
    settings = deploy_config.load(project_dir, stage)
    _check_policy_wiring(project_dir, stage)
    progress = Progress(3, say)
    progress.step("IAM policy files")
    progress.report(_policy_files(project_dir, settings))
    env = dict(os.environ)
    if not boto3.Session().region_name:
        env["AWS_DEFAULT_REGION"] = "us-east-1"
    shown = _relative(out_dir, project_dir)
    with tempfile.TemporaryDirectory() as scratch:
        merge = Path(scratch) / "merge-template.json"
        merge.write_text(json.dumps(template.merge_template(settings), indent=2))
        progress.step(f"chalice package --stage {stage} → {shown}/")
        _run(run, [tool("chalice"), "package", "--stage", stage, "--merge-template", str(merge),
                   str(out_dir)], project_dir, env)
    sam = out_dir / "sam.json"
    progress.step(f"cfn-lint {shown}/sam.json")
    progress.report([_lint(run, sam, project_dir, env)])
    say(
        f"\nTemplate: {shown}/sam.json. To deploy it with CloudFormation instead of make deploy:\n"
        f"  aws cloudformation package --template-file {shown}/sam.json --s3-bucket <bucket> "
        f"--output-template-file {shown}/packaged.yaml\n"
        f"  aws cloudformation deploy --template-file {shown}/packaged.yaml "
        f"--stack-name {settings.resource_prefix} --capabilities CAPABILITY_IAM\n"
        "Its outputs IngestURL and ApiKeyId give the stream settings; the key value is\n"
        "  aws apigateway get-api-key --include-value --api-key <ApiKeyId> --query value"
    )
    return sam


def _lint(run: Runner, sam: Path, project_dir: Path, env: dict[str, str]) -> str:
    """cfn-lint's exit status is a bit mask: 2 errors, 4 warnings, 8 notes."""
    status = run([tool("cfn-lint"), str(sam)], project_dir, env)
    if status & 2 or status & 1:
        raise DeployError(f"cfn-lint found errors in {sam} (exit {status}); see above")
    return "no errors" + (", warnings above" if status & 4 else "")


def _relative(path: Path, base: Path) -> Path:
    """Short paths in messages when the output is inside the project."""
    try:
        return path.relative_to(base)
    except ValueError:
        return path


# --- deploy ------------------------------------------------------------------


def deploy(
    project_dir: Path, stage: str, run: Runner = run_command, say: Say = print
) -> StreamSettings:
    """Queues, ``chalice deploy``, key and plan, allow-list, trigger; in order.

    The queues come first because ``chalice deploy`` looks the queue up to
    subscribe ``consume``; everything bound to the API comes after it,
    because only then does the REST API exist.
    """
    settings = deploy_config.load(project_dir, stage)
    _check_policy_wiring(project_dir, stage)
    session = _session(say)
    sqs, apigw = session.client("sqs"), session.client("apigateway")
    progress = Progress(6, say)

    progress.step("IAM policy files")
    progress.report(_policy_files(project_dir, settings))

    progress.step("SQS queue and dead-letter queue")
    progress.report(provision.ensure_queues(sqs, settings))

    progress.step(f"chalice deploy --stage {stage}")
    _run(run, [tool("chalice"), "deploy", "--stage", stage], project_dir, dict(os.environ))
    deployed = read_deployed(project_dir, settings)

    progress.step("API key and usage plan")
    key, outcomes = provision.ensure_key_and_plan(apigw, settings, deployed.rest_api_id)
    progress.report(outcomes)

    progress.step("source-IP allow-list")
    progress.report([
        provision.ensure_source_ip_policy(
            apigw, deployed.rest_api_id, settings.api_gateway_stage, settings.source_ips
        )
    ])

    progress.step("consumer trigger")
    progress.report([
        provision.ensure_batch_item_failures(session.client("lambda"), deployed.consume_event_uuid)
    ])

    stream = StreamSettings(uri=deployed.rest_api_url.rstrip("/") + "/flespi", api_key=key.value)
    say(stream_settings_text(stream, settings))
    return stream


def read_deployed(project_dir: Path, settings: StageSettings) -> Deployed:
    """Find the REST API and ``consume``'s trigger in Chalice's record."""
    path = project_dir / ".chalice" / "deployed" / f"{settings.stage}.json"
    try:
        resources = json.loads(path.read_text())["resources"]
    except (FileNotFoundError, ValueError, KeyError):
        raise DeployError(f"{path} is missing or unreadable: did `chalice deploy` finish?") from None
    api = next((r for r in resources if r.get("resource_type") == "rest_api"), None)
    trigger = next(
        (
            r
            for r in resources
            if r.get("resource_type") == "sqs_event" and r.get("queue") == settings.queue_name
        ),
        None,
    )
    if api is None or trigger is None:
        raise DeployError(f"{path} has no REST API or no SQS trigger on {settings.queue_name}")
    return Deployed(
        rest_api_id=api["rest_api_id"],
        rest_api_url=api["rest_api_url"],
        consume_event_uuid=trigger["event_uuid"],
    )


def stream_settings_text(stream: StreamSettings, settings: StageSettings) -> str:
    """The block a user pastes into flespi, with the batch-size caveat."""
    rotate = f"{SELF} rotate-key --stage {settings.stage}"
    retire = f"{SELF} retire-keys --stage {settings.stage}"
    allow = ", ".join(settings.source_ips) or "off (any address with the key)"
    return f"""
flespi HTTP stream settings — stage {settings.stage}
  URI             {stream.uri}
  method          POST, body: JSON array of messages
  custom header   x-api-key: {stream.api_key}
  limit_messages  {SUGGESTED_LIMIT_MESSAGES} at most — a batch must stay well under Lambda's 6 MB
                  (~{SUGGESTED_LIMIT_MESSAGES:,} messages of ~1 KB); API Gateway passes the body
                  base64-encoded, a third larger, so a body over ~4.4 MB never arrives. Lower it
                  for larger messages, or flespi resends an oversized batch forever.
  source IPs      {allow}

Rotate the key: {rotate}
  adds a new key (the old one keeps working); paste its value into the stream, then
  {retire}"""


# --- destroy -----------------------------------------------------------------


def destroy(
    project_dir: Path,
    stage: str,
    delete_queues: bool = False,
    run: Runner = run_command,
    say: Say = print,
) -> None:
    """Undo ``deploy``: plan and keys first (a bound plan pins the API).

    Queues go only on request: they may hold messages nobody has read yet.
    """
    settings = deploy_config.load(project_dir, stage)
    session = _session(say)
    apigw = session.client("apigateway")
    progress = Progress(4, say)

    progress.step("usage plan")
    progress.report([provision.delete_usage_plan(apigw, settings.resource_prefix)])

    progress.step("API keys")
    progress.report(provision.delete_api_keys(apigw, settings.api_key_prefix))

    progress.step(f"chalice delete --stage {stage}")
    if (project_dir / ".chalice" / "deployed" / f"{stage}.json").exists():
        _run(run, [tool("chalice"), "delete", "--stage", stage], project_dir, dict(os.environ))
    else:
        progress.report([provision.Outcome("absent", f"app (no .chalice/deployed/{stage}.json)")])

    progress.step("queues")
    names = [settings.queue_name, settings.dlq_name]
    if delete_queues:
        sqs = session.client("sqs")
        progress.report([provision.delete_queue(sqs, name) for name in names])
    else:
        progress.report([
            provision.Outcome(
                "kept",
                f"{', '.join(names)} (they may hold messages; "
                "DELETE_QUEUES=1 / --delete-queues removes them)",
            )
        ])


# --- key rotation ------------------------------------------------------------


def rotate_key(project_dir: Path, stage: str, say: Say = print) -> provision.ApiKey:
    """Add a new key to the stage's plan and print it; the old one still works."""
    settings = deploy_config.load(project_dir, stage)
    apigw = _session(say).client("apigateway")
    plan = provision.find_usage_plan(apigw, settings.resource_prefix)
    if plan is None:
        raise DeployError(f"stage {stage} has no usage plan; run `make deploy` first")
    key, outcome = provision.rotate_api_key(apigw, settings.api_key_prefix, plan["id"])
    say(f"      {outcome}")
    say(
        f"\nSet the flespi stream's header to  x-api-key: {key.value}\n"
        f"then retire the old key(s): {SELF} retire-keys --stage {stage}"
    )
    return key


def retire_keys(project_dir: Path, stage: str, say: Say = print) -> None:
    """Delete the stage's keys older than the newest, once flespi uses it."""
    settings = deploy_config.load(project_dir, stage)
    apigw = _session(say).client("apigateway")
    outcomes = provision.retire_api_keys(apigw, settings.api_key_prefix)
    for outcome in outcomes or [provision.Outcome("unchanged", "only the current key exists")]:
        say(f"      {outcome}")


# --- shared ------------------------------------------------------------------


def _policy_files(project_dir: Path, settings: StageSettings) -> list[provision.Outcome]:
    changed = policies.write_policy_files(project_dir, settings)
    if not changed:
        return [provision.Outcome("unchanged", "policy files")]
    return [provision.Outcome("updated", str(path.relative_to(project_dir))) for path in changed]


def _check_policy_wiring(project_dir: Path, stage: str) -> None:
    """Refuse early, with the JSON to add, rather than ship another policy."""
    chalice_config = json.loads((project_dir / ".chalice" / "config.json").read_text())
    missing = policies.missing_policy_wiring(chalice_config, stage)
    if missing:
        wanted = {
            f: {"iam_policy_file": policies.policy_file_name(stage, f)} for f in missing
        }
        raise DeployError(
            f".chalice/config.json: stage {stage!r} must name each function's policy file, "
            f'add under stages.{stage}: "lambda_functions": {json.dumps(wanted)}'
        )


def _session(say: Say) -> boto3.Session:
    """A session whose credentials AWS accepts; checked before any change."""
    session = boto3.Session()
    if session.get_credentials() is None:
        raise DeployError(
            "no AWS credentials found. Set AWS_PROFILE, run `aws configure` or "
            "`aws sso login`, or export AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY. "
            "Nothing was changed."
        )
    if not session.region_name:
        raise DeployError(
            "no AWS region set. Export AWS_DEFAULT_REGION (e.g. eu-central-1) or set "
            "region in ~/.aws/config. Nothing was changed."
        )
    try:
        account = session.client("sts").get_caller_identity()["Account"]
    except (ClientError, BotoCoreError) as error:
        raise DeployError(f"AWS did not accept the credentials: {error}. Nothing was changed.") from None
    say(f"AWS account {account}, region {session.region_name}, profile "
        f"{session.profile_name}")
    return session


def _run(run: Runner, command: list[str], cwd: Path, env: dict[str, str]) -> None:
    status = run(command, cwd, env)
    if status != 0:
        raise DeployError(f"`{Path(command[0]).name} {command[1]}` failed (exit {status}); see above")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.deploy", description=__doc__.split("\n")[0])
    parser.add_argument(
        "command", choices=["package", "deploy", "destroy", "rotate-key", "retire-keys"]
    )
    parser.add_argument("--stage", default="dev", help="a stage of .chalice/config.json")
    parser.add_argument(
        "--delete-queues", action="store_true", help="destroy: delete the queues too"
    )
    args = parser.parse_args(argv)
    commands: dict[str, Callable[[], object]] = {
        "package": lambda: package(PROJECT_DIR, args.stage, PROJECT_DIR / "dist" / args.stage),
        "deploy": lambda: deploy(PROJECT_DIR, args.stage),
        "destroy": lambda: destroy(PROJECT_DIR, args.stage, args.delete_queues),
        "rotate-key": lambda: rotate_key(PROJECT_DIR, args.stage),
        "retire-keys": lambda: retire_keys(PROJECT_DIR, args.stage),
    }
    try:
        commands[args.command]()
    except (DeployError, DeployConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (ClientError, BotoCoreError) as error:
        print(f"error: AWS refused a step: {error}\nRe-run once fixed; "
              "finished steps are not repeated.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
