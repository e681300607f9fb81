"""The ``mlmirror`` command line.

mlmirror serve --config FILE        run the proxy (SIGTERM drains and exits 0, SIGHUP reloads FILE)
mlmirror check-config FILE          validate a config; exit 1 with file:line: key: reason when invalid
mlmirror demo                       demo models + proxy + traffic, with commentary
mlmirror model-server --model NAME  serve one demo model over KServe V2 gRPC
mlmirror status / reload            ask a running proxy's admin endpoint
mlmirror shadows                    a running proxy's shadows and their promotion verdicts, as a table
mlmirror promote ROUTE SHADOW       make a shadow the primary of its route (no call fails)
mlmirror drift                      a running proxy's drift windows, as tables
mlmirror profile build --data F --out P   a drift reference profile from a data file or a capture
mlmirror replay --capture P --target H:P  replay captured calls against a candidate and gate the release (exit 0/1/2)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

# gRPC core logs connection chatter (GOAWAY, reconnects) at INFO on stderr; the proxy reports what matters itself.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from mlmirror import __version__
from mlmirror.config import load_config
from mlmirror.config.yamlsource import parse_duration
from mlmirror.errors import AdminError, ConfigError, StartError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.run(args)
    except (ConfigError, StartError, AdminError) as exc:
        print(f"mlmirror: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds is None:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: e.g. 30s, 2m")
    return seconds


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlmirror", description="gRPC inference proxy that watches your models.")
    parser.add_argument("--version", action="version", version=f"mlmirror {__version__}")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", "-c", required=True, help="YAML configuration file")
    serve.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop")
    serve.add_argument("--workers", type=_positive, default=1, metavar="N",
                       help="serving worker processes sharing the port (default 1); one observing process beside "
                       "them makes the shadow copies and measures drift")  # fmt: skip
    serve.add_argument(
        "--single-process",
        action="store_true",
        help="one process serves and observes (for debugging; watching then costs serving CPU)",
    )
    serve.set_defaults(run=_serve)

    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")
    check.set_defaults(run=_check_config)

    demo = sub.add_parser("demo", help="demo models, the proxy and traffic, with commentary")
    demo.add_argument("--duration", type=_duration, default=30.0, help="how long (default 30s)")
    demo.add_argument("--rate", type=float, default=50.0, help="calls per second (default 50)")
    demo.add_argument("--listen", default="127.0.0.1:8500", help="proxy gRPC address (default 127.0.0.1:8500)")
    demo.add_argument("--admin", default="127.0.0.1:9500", help="admin HTTP address (default 127.0.0.1:9500)")
    demo.add_argument("--linger", type=_duration, default=60.0,
                      help="keep the dashboard up this long after the traffic (default 60s; Ctrl-C: stop)")  # fmt: skip
    demo.set_defaults(run=_demo)

    model = sub.add_parser("model-server", help="serve one demo model over KServe V2 gRPC")
    model.add_argument("--model", choices=("production", "candidate", "baseline"), default="production")
    model.add_argument("--listen", default="127.0.0.1:9001")
    model.set_defaults(run=_model_server)

    profile = sub.add_parser("profile", help="drift reference profiles")
    profile_sub = profile.add_subparsers(dest="profile_command", metavar="ACTION", required=True)
    build = profile_sub.add_parser(
        "build", help="build a profile from a data file (.npy, .npz, .csv, .parquet) or a capture (.jsonl, directory)"
    )
    build.add_argument("--data", required=True, help="reference data file, capture file or capture directory")
    build.add_argument("--out", required=True, help="profile to write (.npz)")
    build.add_argument("--bins", type=int, default=10, help="quantile bins per numeric feature (default 10)")
    build.add_argument("--model", default="", help="model name to record")
    build.add_argument("--model-version", default="", help="model version to record")
    build.add_argument("--input", default=None,
                       help="input tensor of .npy/.csv/.parquet columns (default: the model's only input)")  # fmt: skip
    build.add_argument("--names", help="comma-separated series names for .npy/.npz columns")
    build.set_defaults(run=_profile_build)

    _replay_parser(sub)

    for name, helptext, run in (
        ("status", "print a running proxy's /status", _status),
        ("reload", "ask a running proxy to reload its config file", _reload),
        ("shadows", "print a running proxy's shadows and promotion verdicts", _shadows),
        ("promote", "make a shadow the primary of its route", _promote),
        ("drift", "print a running proxy's latest drift windows", _drift),
    ):
        command = sub.add_parser(name, help=helptext)
        command.add_argument("--admin", default="127.0.0.1:9500", help="admin address (default 127.0.0.1:9500)")
        command.set_defaults(run=run)
        if name == "promote":
            command.add_argument("route", help="route name")
            command.add_argument("shadow", help="shadow name")
            command.add_argument("--force", action="store_true", help="promote even when the verdict says no")
    return parser


def _replay_parser(sub: argparse._SubParsersAction) -> None:
    replay = sub.add_parser(
        "replay",
        help="replay captured calls against a candidate and gate the release",
        description="Exit 0: the gate passes; 1: it fails; 2: the replay could not run.",
    )
    replay.add_argument("--capture", required=True, action="append", metavar="PATH",
                        help="capture file or directory (rotated files included); may be repeated")  # fmt: skip
    replay.add_argument("--target", required=True, metavar="HOST:PORT", help="the candidate's KServe V2 gRPC address")
    replay.add_argument("--gate", metavar="FILE", help="gate YAML (default: the promotion defaults; docs/REPLAY.md)")
    replay.add_argument("--report", metavar="DIR", help="write report.md, junit.xml and report.json here")
    replay.add_argument("--concurrency", type=_positive, default=8, metavar="N", help="calls in flight (default 8)")
    replay.add_argument("--rate", type=float, default=0.0, metavar="R", help="calls per second (default 0: no limit)")
    replay.add_argument("--limit", type=_positive, metavar="N", help="replay at most the first N usable calls")
    replay.add_argument("--timeout", type=_duration, default=10.0, metavar="DURATION", help="per call (default 10s)")
    replay.add_argument("--connect-timeout", type=_duration, default=10.0, metavar="DURATION",
                        help="to reach the target before giving up with exit 2 (default 10s)")  # fmt: skip
    replay.add_argument("--model", metavar="NAME", help="send the calls to this KServe model name instead")
    replay.add_argument("--tls", action="store_true", help="TLS to the target (system roots unless --tls-ca)")
    replay.add_argument("--tls-ca", metavar="PEM", help="CA bundle for the target's certificate (implies --tls)")
    replay.add_argument("--tls-cert", metavar="PEM", help="client certificate for mTLS (implies --tls)")
    replay.add_argument("--tls-key", metavar="PEM", help="client key for mTLS (implies --tls)")
    replay.add_argument("--tls-server-name", metavar="NAME", help="name to verify the certificate against")
    replay.set_defaults(run=_replay)


def _replay(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mlmirror.config import TlsClient
    from mlmirror.replay.run import COULD_NOT_RUN, ReplayJob, run_replay
    from mlmirror.replay.sender import SendOptions

    if not args.rate >= 0:
        print("mlmirror replay: could not run: --rate must be 0 or more calls per second", file=sys.stderr)
        return COULD_NOT_RUN
    tls_files = (args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    tls = TlsClient(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name)
    send = SendOptions(concurrency=args.concurrency, rate=args.rate, timeout=args.timeout,
                       connect_timeout=args.connect_timeout, tls=tls if args.tls or any(tls_files) else None,
                       model=args.model)  # fmt: skip
    job = ReplayJob(captures=tuple(Path(p) for p in args.capture), target=args.target,
                    gate=Path(args.gate) if args.gate else None, report=Path(args.report) if args.report else None,
                    limit=args.limit, send=send)  # fmt: skip
    return run_replay(job)


def _serve(args: argparse.Namespace) -> int:
    from mlmirror.eventloop import run
    from mlmirror.runtime.proxy import Proxy

    if not args.single_process:
        from mlmirror.runtime.supervisor import Supervisor

        async def supervise() -> None:
            supervisor = Supervisor(args.config, args.workers, use_uvloop=not args.no_uvloop,
                                    log_level=args.log_level)  # fmt: skip
            await supervisor.start()
            await supervisor.run_until_signalled()

        run(supervise(), use_uvloop=not args.no_uvloop)
        return 0
    config = load_config(args.config)

    async def serve() -> None:
        proxy = Proxy(config)
        await proxy.start()
        await proxy.run_until_signalled()

    run(serve(), use_uvloop=not args.no_uvloop)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    print(
        f"{args.file}: ok: listen {config.listen}, admin {config.admin or 'off'}, "
        f"{len(config.upstreams)} upstreams, {len(config.routes)} routes "
        f"({', '.join(route.name for route in config.routes)})"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mlmirror.demo.run import main as demo_main

    logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
    return demo_main(args.duration, args.rate, args.listen, args.admin, args.linger)


def _model_server(args: argparse.Namespace) -> int:
    from mlmirror.demo.models import serve_forever
    from mlmirror.eventloop import run

    run(serve_forever(args.model, args.listen))
    return 0


def _admin_request(admin: str, path: str, method: str = "GET") -> tuple[int, str]:
    """Ask the admin endpoint; the bearer token, when the proxy wants one, comes from ``$MLMIRROR_ADMIN_TOKEN``."""
    request = urllib.request.Request(f"http://{admin}{path}", method=method, data=b"" if method == "POST" else None)
    token = os.environ.get("MLMIRROR_ADMIN_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token.strip()}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        raise AdminError(f"cannot reach the admin endpoint at {admin}: {exc}") from None


def _status(args: argparse.Namespace) -> int:
    code, body = _admin_request(args.admin, "/status")
    print(json.dumps(json.loads(body), indent=2) if code == 200 else body, end="" if code != 200 else "\n")
    return 0 if code == 200 else 1


def _reload(args: argparse.Namespace) -> int:
    code, body = _admin_request(args.admin, "/reload", "POST")
    print(body, end="")
    return 0 if code == 200 else 1


def _shadows(args: argparse.Namespace) -> int:
    from mlmirror.cli.shadows import render_shadows

    return _print_status(args.admin, render_shadows)


def _print_status(admin: str, render: Callable[[dict], str]) -> int:
    """Fetch a running proxy's ``/status`` and print it as ``render`` lays it out."""
    code, body = _admin_request(admin, "/status")
    if code != 200:
        print(body, end="")
        return 1
    print(render(json.loads(body)))
    return 0


def _promote(args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode({"route": args.route, "shadow": args.shadow, "force": int(args.force)})
    code, body = _admin_request(args.admin, f"/promote?{query}", "POST")
    print(body, end="", file=sys.stdout if code == 200 else sys.stderr)
    return 0 if code == 200 else 1


def _drift(args: argparse.Namespace) -> int:
    from mlmirror.observing.drift.report import render_drift

    return _print_status(args.admin, render_drift)


def _profile_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mlmirror.observing.drift.profile_build import build_profile

    if args.bins < 1:
        print("mlmirror: --bins must be at least 1", file=sys.stderr)
        return 1
    try:
        reference = build_profile(
            Path(args.data), Path(args.out), bins=args.bins, model=args.model, version=args.model_version,
            input_name=args.input, names=args.names.split(",") if args.names else None,
        )  # fmt: skip
    except (OSError, ValueError) as exc:
        print(f"mlmirror: {exc}", file=sys.stderr)
        return 1
    info = reference.describe()
    print(
        f"{args.out}: {info['rows']} rows, {len(info['series'])} series ({', '.join(info['series'])}), {args.bins} bins"
    )
    return 0
