"""``make run``: the whole pipeline in one process, no AWS account needed.

One process, three parts, so Ctrl-C has exactly one thing to stop and no
child can outlive it:

* an embedded SQS: moto's server on a loopback port, in a thread, with the
  stage's queue and its dead-letter queue (redrive after MAX_RECEIVE_COUNT);
* the app's routes on Chalice's local server, which would ignore
  ``api_key_required`` (Chalice issues #899, #736); ``ApiKeyGateway`` answers
  403 the way API Gateway does before the view runs;
* the app's ``on_sqs_message`` handlers, fed by ``tools.sqs_trigger``.

Environment: PORT (8000), API_KEY (random, printed), SQS_PORT (9324),
MAX_RECEIVE_COUNT (5), VISIBILITY_TIMEOUT (30 s), STAGE (dev). stdout stays
for the app's data (the consumer's log sink); everything of ours goes to
stderr.
"""
from __future__ import annotations

import argparse
import functools
import hmac
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Mapping

import boto3
from chalice.app import Chalice
from chalice.cli.factory import CLIFactory
from chalice.config import Config
from chalice.local import (
    ChaliceRequestHandler,
    ForbiddenError,
    LocalDevServer,
    LocalGateway,
    RouteMatcher,
    create_local_server,
)

from tools import sqs_trigger

LOG = logging.getLogger("local_run")
HOST = "127.0.0.1"
SAMPLES = "samples/flespi_messages.json"
#: Long-poll length of the local trigger: an idle poll costs nothing against
#: the embedded SQS, and Ctrl-C waits for at most one of them.
POLL_SECONDS = 1
#: How long Ctrl-C waits for a consumer batch in progress.
STOP_GRACE_SECONDS = 5


@dataclass(frozen=True)
class Options:
    """What the environment and the command line ask for."""

    project_dir: Path
    stage: str
    port: int
    sqs_port: int
    api_key: str
    max_receive_count: int
    visibility_timeout: int


def _int_env(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name} must be an integer, not {raw!r}") from None


def parse_options(argv: list[str] | None, environ: Mapping[str, str]) -> Options:
    """Options from the command line (project, stage) and the environment (the rest)."""
    parser = argparse.ArgumentParser(prog="python -m tools.local_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", type=Path, default=Path.cwd(),
                        help="the Chalice project to run (default: the current directory)")
    parser.add_argument("--stage", default=environ.get("STAGE", "dev"),
                        help="the stage of .chalice/config.json whose environment to use")
    args = parser.parse_args(argv)
    return Options(
        project_dir=args.project_dir.resolve(),
        stage=args.stage,
        port=_int_env(environ, "PORT", 8000),
        sqs_port=_int_env(environ, "SQS_PORT", 9324),
        api_key=environ.get("API_KEY", "").strip() or secrets.token_urlsafe(24),
        max_receive_count=_int_env(environ, "MAX_RECEIVE_COUNT", 5),
        visibility_timeout=_int_env(environ, "VISIBILITY_TIMEOUT", 30),
    )


class ApiKeyGateway(LocalGateway):
    """Chalice's fake API Gateway plus the API-key check it leaves out.

    API Gateway rejects a request to a route with ``api_key_required`` when
    ``x-api-key`` is missing or unknown, before Lambda is invoked, with 403
    and ``{"message":"Forbidden"}``. Requests to unknown routes or methods go
    on to Chalice, which answers them as API Gateway does.
    """

    def __init__(self, app_object: Chalice, config: Config, api_key: str) -> None:
        super().__init__(app_object, config)
        self._api_key = api_key.encode()
        self._routes = RouteMatcher(list(app_object.routes))

    def handle_request(self, method: str, path: str, headers: dict, body: bytes | None) -> dict:
        if self._key_required(method, path) and not self._key_matches(headers):
            raise ForbiddenError(
                {"x-amzn-ErrorType": "ForbiddenException"}, b'{"message":"Forbidden"}'
            )
        return super().handle_request(method, path, headers, body)

    def _key_required(self, method: str, path: str) -> bool:
        try:
            route = self._routes.match_route(path).route
        except ValueError:
            return False
        entry = self._app_object.routes[route].get(method)
        return bool(entry and entry.api_key_required)

    def _key_matches(self, headers: Mapping[str, str]) -> bool:
        """Header names are case-insensitive, the key is not."""
        sent = next((v for k, v in headers.items() if k.lower() == "x-api-key"), "")
        return hmac.compare_digest(sent.encode(), self._api_key)


class ApiKeyRequestHandler(ChaliceRequestHandler):
    """Chalice's request handler on ``ApiKeyGateway``, logging one stderr line per request."""

    _started = float("nan")

    def __init__(self, request: Any, client_address: Any, server: Any,
                 app_object: Chalice, config: Config, api_key: str) -> None:
        # What ChaliceRequestHandler.__init__ does, with our gateway: the
        # request is served inside BaseHTTPRequestHandler.__init__, so the
        # gateway must be in place before it is called.
        self.local_gateway = ApiKeyGateway(app_object, config, api_key)
        BaseHTTPRequestHandler.__init__(self, request, client_address, server)

    def parse_request(self) -> bool:
        """Start the clock once the request line is in, not while a connection idles."""
        self._started = time.perf_counter()
        return super().parse_request()

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        LOG.info("%s %s -> %s in %.0f ms", self.command, self.path, code,
                 (time.perf_counter() - self._started) * 1000)


def build_http_server(app: Chalice, config: Config, options: Options) -> LocalDevServer:
    """Chalice's local server (it binds the port now) answering through our handler.

    ``create_local_server`` also makes ``app.current_request`` thread-local,
    which the threaded server needs; only the handler class is ours.
    """
    server = create_local_server(app, config, HOST, options.port)
    server.server.RequestHandlerClass = functools.partial(
        ApiKeyRequestHandler, app_object=app, config=config, api_key=options.api_key
    )
    return server


def point_aws_at(endpoint: str) -> None:
    """Send every boto3 client of this process to the embedded SQS.

    Credentials are replaced with fake ones so a developer's real keys or SSO
    profile are neither used nor needed.
    """
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(name, None)
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ENDPOINT_URL_SQS=endpoint,
        AWS_ACCESS_KEY_ID="local",
        AWS_SECRET_ACCESS_KEY="local",
    )
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def start_sqs(port: int) -> tuple[Any, int]:
    """moto's server in a thread of this process; returns it and its port.

    moto would wait forever for a server that failed to bind, so a busy port
    is detected here first.
    """
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            raise SystemExit(f"SQS_PORT {port} is not free ({exc}); pick another") from None
    server = ThreadedMotoServer(ip_address=HOST, port=port, verbose=False)
    server.start()
    return server, server.get_host_and_port()[1]


def dlq_name(queue_name: str) -> str:
    """``x`` -> ``x-dlq``; a FIFO queue's DLQ must be FIFO too: ``x.fifo`` -> ``x-dlq.fifo``."""
    if queue_name.endswith(".fifo"):
        return queue_name[: -len(".fifo")] + "-dlq.fifo"
    return queue_name + "-dlq"


def provision(sqs: Any, queue_name: str, max_receive_count: int, visibility_timeout: int) -> str:
    """Create the queue and its dead-letter queue; returns the DLQ's name."""
    fifo = {"FifoQueue": "true"} if queue_name.endswith(".fifo") else {}
    dlq = dlq_name(queue_name)
    dlq_url = sqs.create_queue(QueueName=dlq, Attributes=fifo)["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}
    sqs.create_queue(
        QueueName=queue_name,
        Attributes={
            **fifo,
            "RedrivePolicy": json.dumps(redrive),
            "VisibilityTimeout": str(visibility_timeout),
        },
    )
    return dlq


def stage_environment(config: Config, environ: Mapping[str, str]) -> dict[str, str]:
    """The stage's variables, each overridable from the shell (``PACKING=on make run``)."""
    return {name: environ.get(name, value) for name, value in config.environment_variables.items()}


def curl_line(url: str, api_key: str, project_dir: Path) -> str:
    """A command to paste: the sample batch if the project has it, else an empty one."""
    data = f"@{SAMPLES}" if (project_dir / SAMPLES).is_file() else "[]"
    return shlex.join([
        "curl", "-sS", "-X", "POST", url, "-H", f"x-api-key: {api_key}",
        "-H", "Content-Type: application/json", "--data-binary", data,
    ])


def banner(app: Chalice, options: Options, port: int, sqs_endpoint: str,
           queues: Mapping[str, str], sources: list[sqs_trigger.SqsSource]) -> str:
    """The block printed at start: where to send, with what, and where it goes."""
    base = f"http://{HOST}:{port}"
    lines = [f"{app.app_name} running locally (stage {options.stage}); Ctrl-C stops everything"]
    keyed = []
    for path, methods in app.routes.items():
        for method, entry in methods.items():
            needs = f"   header  x-api-key: {options.api_key}" if entry.api_key_required else ""
            lines.append(f"  route     {method} {base}{path}{needs}")
            if entry.api_key_required and method == "POST":
                keyed.append(f"{base}{path}")
    for queue, dlq in queues.items():
        lines.append(f"  queue     {queue}   DLQ {dlq} after {options.max_receive_count} "
                     f"receives; visibility {options.visibility_timeout} s")
    for source in sources:
        lines.append(f"  consumer  {source.name} <- {source.queue_name}   batch "
                     f"{source.batch_size}, window {source.batching_window} s")
    lines.append(f"  SQS       AWS_ENDPOINT_URL={sqs_endpoint} (any credentials)")
    if keyed:
        lines.append(f"  try       {curl_line(keyed[0], options.api_key, options.project_dir)}")
    return "\n".join(lines)


def load_app(options: Options) -> tuple[Chalice, Config]:
    """Import the project's app as ``chalice local`` does, in the stage's environment.

    The app reads its settings at import, so the variables must be in place
    first; unlike ``chalice local``, a variable set in the shell wins over
    the stage's value, so ``PACKING=on make run`` works.
    """
    factory = CLIFactory(str(options.project_dir), environ=os.environ)
    config = factory.create_config_obj(chalice_stage_name=options.stage)
    return factory.load_chalice_app(stage_environment(config, os.environ)), config


def serve(options: Options, stop: threading.Event) -> None:
    """Run everything until ``stop`` is set, then take it down in reverse order."""
    sqs_server, sqs_port = start_sqs(options.sqs_port)
    try:
        endpoint = f"http://{HOST}:{sqs_port}"
        point_aws_at(endpoint)
        app, config = load_app(options)
        sources = sqs_trigger.discover(app, config, options.stage)
        sqs = boto3.client("sqs")
        queues = {
            name: provision(sqs, name, options.max_receive_count, options.visibility_timeout)
            for name in dict.fromkeys(source.queue_name for source in sources)
        }
        http = build_http_server(app, config, options)
        pollers = [sqs_trigger.SqsPoller(source, sqs, POLL_SECONDS) for source in sources]
        for poller in pollers:
            poller.start()
        threading.Thread(target=http.server.serve_forever, name="http", daemon=True).start()
        port = http.server.server_address[1]
        sys.stderr.write(banner(app, options, port, endpoint, queues, sources) + "\n")
        LOG.info("ready: listening on http://%s:%s", HOST, port)
        stop.wait()
        LOG.info("stopping")
        http.shutdown()
        http.server.server_close()
        for poller in pollers:
            poller.stop(STOP_GRACE_SECONDS)
    finally:
        sqs_server.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``make run``; SIGINT and SIGTERM stop it cleanly."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    # The consumer's lines must reach a pipe or file as they are printed.
    sys.stdout.reconfigure(line_buffering=True)
    # Our own lines at INFO; moto's per-request and botocore's chatter only
    # when something is wrong.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for logger in (LOG, sqs_trigger.LOG):
        logger.setLevel(logging.INFO)
    # werkzeug (moto's server) raises its own logger to INFO unless it has a level.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    serve(parse_options(argv, os.environ), stop)
    LOG.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
