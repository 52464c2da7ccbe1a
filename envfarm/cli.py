"""The `envfarm` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"render_mode\": null}'")
    return value


def _owner(text: str) -> tuple[int, int]:
    uid, _, gid = text.partition(":")
    if not uid.isdigit() or not (gid.isdigit() or gid == ""):
        raise argparse.ArgumentTypeError("must be a numeric UID or UID:GID, e.g. 1000")
    return int(uid), int(gid) if gid else -1


def _unreadable_keys(command: str, *paths: str | None) -> bool:
    """Says, in one line naming the file and this process's uid, why a key file (or folder of
    them) cannot be read; a key a container's user cannot read is the usual first failure of a
    farm with Curve on. Checked before anything starts."""
    from envfarm.transport.curve import unreadable

    for path in paths:
        reason = unreadable(path) if path else None
        if reason:
            print(f"envfarm {command}: {reason}", file=sys.stderr)
            return True
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="envfarm", description="Gymnasium vector environments over ZeroMQ.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a random policy in a local farm and report throughput")
    run.add_argument("env_id", help="a registered Gymnasium env id, e.g. CartPole-v1")
    run.add_argument("--num-envs", type=int, default=16, help="envs stepped together (default 16)")
    run.add_argument("--steps", type=int, default=100_000, help="env steps in total (default 100000)")
    run.add_argument("--num-workers", type=int, default=None, help="worker processes (default: one per CPU)")
    run.add_argument(
        "--seed", type=int, default=0, help="seed of the first env's reset; env i gets seed + i (default 0)"
    )
    run.add_argument("--env-kwargs", type=_json_object, default=None, help="JSON object of env constructor arguments")
    run.add_argument("--no-shared-memory", action="store_true", help="send observations on the socket")
    run.add_argument(
        "--context",
        choices=["fork", "spawn", "forkserver"],
        default=None,
        help="how worker processes start (default: multiprocessing's default here)",
    )
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.add_argument(
        "--broker",
        help="lease the envs' workers from a farm broker (e.g. tcp://head:5555) instead of starting local ones",
    )
    run.add_argument(
        "--on-failure",
        choices=["raise", "restart"],
        default="raise",
        help="with --broker: what a lost worker does (default raise)",
    )
    run.add_argument("--curve-secret", help="with --broker, CurveZMQ: this trainer's secret key file")
    run.add_argument("--broker-key", help="with --broker, CurveZMQ: the broker's public key file")

    broker = commands.add_parser("broker", help="run a farm broker that leases workers to trainers")
    _log_level_argument(broker)
    broker.add_argument(
        "--bind", default="tcp://0.0.0.0:5555", help="endpoint for workers and trainers (default tcp://0.0.0.0:5555)"
    )
    broker.add_argument(
        "--dead-after", type=float, default=5.0, help="seconds of silence after which a worker is lost (default 5)"
    )
    broker.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (workers, slots, leases, steps/s, restarts, lost workers)",
    )
    broker.add_argument("--curve-secret", help="CurveZMQ: this broker's secret key file (envfarm keygen)")
    broker.add_argument(
        "--curve-clients",
        help="CurveZMQ: directory of the public key files (*.key) it admits, by role in its subdirectories workers/ (may register), "
        "trainers/ (may lease, release and ask status) and admins/ (may ask status); keys right in the directory, without those "
        "subdirectories, may do everything",
    )

    worker = commands.add_parser("worker", help="run a farm worker that serves a broker's trainers")
    _log_level_argument(worker)
    worker.add_argument("--broker", required=True, help="the broker's endpoint, e.g. tcp://head:5555")
    worker.add_argument("--slots", type=int, default=8, help="envs each worker process hosts at most (default 8)")
    worker.add_argument(
        "--processes",
        default="1",
        help="worker processes: a number, or 'auto' for one per CPU this container or host may use (its cgroup quota, not the host's cores); a process that dies is replaced (default 1)",
    )
    worker.add_argument(
        "--alive-file",
        help="touch this file at every heartbeat, for a health check: `envfarm alive FILE` (with several processes, each touches FILE.i)",
    )
    worker.add_argument(
        "--broker-grace",
        type=float,
        default=10.0,
        help="seconds an idle worker may be out of the broker's reach before it stops touching its alive file (default 10)",
    )
    worker.add_argument("--curve-secret", help="CurveZMQ: this worker's secret key file")
    worker.add_argument("--broker-key", help="CurveZMQ: the broker's public key file")
    worker.add_argument(
        "--allow",
        default=None,
        help="comma-separated env id patterns it builds, e.g. 'CartPole-*,ALE/*' (default: Gymnasium's registered ids)",
    )

    _alive_arguments(
        commands.add_parser(
            "alive", help="exit 0 if a farm worker touched FILE (--alive-file) lately: a container health check"
        )
    )

    status = commands.add_parser("status", help="show a broker's workers, their slots and leases")
    status.add_argument("--broker", required=True, help="the broker's endpoint, e.g. tcp://head:5555")
    # Defaults from the environment: a container's health check (`envfarm status --broker ...`)
    # then works unchanged when a deployment turns Curve on, and so does `docker exec ... envfarm status`.
    status.add_argument(
        "--curve-secret",
        default=os.environ.get("ENVFARM_CURVE_SECRET"),
        help="CurveZMQ: this client's secret key file (default: $ENVFARM_CURVE_SECRET)",
    )
    status.add_argument(
        "--broker-key",
        default=os.environ.get("ENVFARM_BROKER_KEY"),
        help="CurveZMQ: the broker's public key file (default: $ENVFARM_BROKER_KEY)",
    )
    status.add_argument("--json", action="store_true")

    keygen = commands.add_parser(
        "keygen",
        help="write a CurveZMQ key pair for each NAME: DIR/NAME.key (public) and DIR/NAME.key_secret (mode 0600)",
    )
    keygen.add_argument("directory")
    keygen.add_argument("names", metavar="name", nargs="+")
    keygen.add_argument(
        "--owner",
        type=_owner,
        metavar="UID[:GID]",
        help="give the files to this user: the one a container that mounts them runs as (the image's is 1000); "
        "another user than yours takes root",
    )

    from envfarm.bench import add_arguments as add_bench_arguments

    bench = commands.add_parser("bench", help="compare envfarm with SyncVectorEnv, AsyncVectorEnv and EnvPool")
    add_bench_arguments(bench)

    from envfarm.tune import add_arguments as add_tune_arguments

    tune = commands.add_parser(
        "tune", help="measure which arrangement of processes steps an env fastest here, and say it"
    )
    add_tune_arguments(tune)
    return parser


def _alive_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("file")
    parser.add_argument("--within", type=float, default=10.0, help="seconds (default 10)")
    return parser


def is_alive(alive_file: str, within: float) -> bool:
    """Whether a farm worker touched `alive_file` in the last `within` seconds, or, for a worker of
    several processes, whether every process touched its own `alive_file`.N (`envfarm alive`)."""
    directory, name = os.path.split(os.path.abspath(alive_file))
    try:
        files = (
            [alive_file]
            if os.path.exists(alive_file)
            else [
                os.path.join(directory, entry)
                for entry in os.listdir(directory)
                if entry.startswith(name + ".") and entry[len(name) + 1 :].isdigit()
            ]
        )
        return bool(files) and all(time.time() - os.path.getmtime(path) <= within for path in files)
    except OSError:
        return False
    # Here, not beside the worker: a health check runs often, and must not load zmq, numpy or gymnasium.


def _log_level_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="registrations, leases, releases and errors are INFO (default INFO), on stderr",
    )


def _log_to_stderr(level: str) -> None:
    from envfarm.server.worker import LOG_FORMAT

    os.environ["ENVFARM_LOG_LEVEL"] = level  # for worker processes started with spawn
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)


def _stop_on_sigterm() -> None:
    """`docker stop` and Kubernetes send SIGTERM, which a process running as PID 1 ignores unless
    it handles it: stop as on Ctrl-C, closing sockets on the way out."""

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["alive"]:  # a health check, run every few seconds: no other command's imports
        args = _alive_arguments(argparse.ArgumentParser(prog="envfarm alive")).parse_args(argv[1:])
        return 0 if is_alive(args.file, args.within) else 1
    args = build_parser().parse_args(argv)
    if args.command == "run":
        import gymnasium

        from envfarm.run import format_summary, run_random_policy

        if args.num_envs < 1 or args.steps < 1:
            print("envfarm run: --num-envs and --steps must be at least 1", file=sys.stderr)
            return 2
        if bool(args.curve_secret) != bool(args.broker_key) or (args.curve_secret and not args.broker):
            print("envfarm run: --curve-secret and --broker-key go together, with --broker", file=sys.stderr)
            return 2
        if _unreadable_keys("run", args.curve_secret, args.broker_key):
            return 2
        farm = {"curve": (args.curve_secret, args.broker_key)} if args.curve_secret else {}
        try:
            summary = run_random_policy(
                args.env_id,
                args.num_envs,
                args.steps,
                seed=args.seed,
                env_kwargs=args.env_kwargs,
                num_workers=args.num_workers,
                shared_memory=not args.no_shared_memory,
                context=args.context,
                broker=args.broker,
                on_failure=args.on_failure,
                **farm,
            )
        except (gymnasium.error.Error, ValueError) as e:
            print(f"envfarm run: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\nenvfarm run: interrupted", file=sys.stderr)
            return 130
        print(format_summary(summary, args.json))
        return 0
    if args.command == "broker":
        from envfarm.server.broker import Broker

        if bool(args.curve_secret) != bool(args.curve_clients):
            print("envfarm broker: --curve-secret and --curve-clients go together", file=sys.stderr)
            return 2
        if _unreadable_keys("broker", args.curve_secret, args.curve_clients):
            return 2
        try:
            broker = Broker(
                args.bind,
                dead_after=args.dead_after,
                curve=(args.curve_secret, args.curve_clients) if args.curve_secret else None,
            )
        except (ValueError, OSError) as e:
            print(f"envfarm broker: {e}", file=sys.stderr)
            return 2
        print(f"envfarm broker on {broker.endpoint}", file=sys.stderr, flush=True)
        metrics = None
        if args.metrics:
            from envfarm.server.metrics import serve_metrics

            try:
                metrics, port = serve_metrics(broker, args.metrics)
            except (ValueError, OSError) as e:
                print(f"envfarm broker: --metrics {args.metrics}: {e}", file=sys.stderr)
                return 2
            print(
                f"envfarm broker metrics on http://{args.metrics.rpartition(':')[0]}:{port}/metrics",
                file=sys.stderr,
                flush=True,
            )
        _log_to_stderr(args.log_level)
        _stop_on_sigterm()
        try:
            broker.serve()
        except KeyboardInterrupt:
            pass
        finally:
            if metrics is not None:
                metrics.shutdown()
        return 0
    if args.command == "worker":
        if bool(args.curve_secret) != bool(args.broker_key):
            print("envfarm worker: --curve-secret and --broker-key go together", file=sys.stderr)
            return 2
        if _unreadable_keys("worker", args.curve_secret, args.broker_key):
            return 2
        from envfarm.protocol import messages as m
        from envfarm.server.worker import run_farm_workers
        from envfarm.transport.cpus import available_cpus

        if not 1 <= args.slots <= m.MAX_SLOTS:
            print(f"envfarm worker: --slots must be from 1 to {m.MAX_SLOTS}", file=sys.stderr)
            return 2
        allow = [pattern for pattern in args.allow.split(",") if pattern] if args.allow else None
        # The broker drops a registration over these bounds: say so here rather than never register.
        if allow is not None and (
            len(allow) > m.MAX_ALLOW
            or sum(map(len, allow)) > m.MAX_ALLOW_CHARS
            or max(map(len, allow), default=0) > m.MAX_PATTERN_CHARS
        ):
            print(
                f"envfarm worker: --allow takes at most {m.MAX_ALLOW} patterns of at most {m.MAX_PATTERN_CHARS} characters, {m.MAX_ALLOW_CHARS} in all",
                file=sys.stderr,
            )
            return 2
        processes = (
            available_cpus() if args.processes == "auto" else int(args.processes) if args.processes.isdigit() else 0
        )
        if processes < 1:
            print(
                f"envfarm worker: --processes must be a positive number or 'auto', got {args.processes!r}",
                file=sys.stderr,
            )
            return 2
        curve = (args.curve_secret, args.broker_key) if args.curve_secret else None
        _log_to_stderr(args.log_level)
        _stop_on_sigterm()
        try:
            run_farm_workers(args.broker, args.slots, processes, allow, curve, args.alive_file, args.broker_grace)
        except KeyboardInterrupt:
            pass
        return 0
    if args.command == "status":
        from envfarm.status import show_status

        if bool(args.curve_secret) != bool(args.broker_key):
            print("envfarm status: --curve-secret and --broker-key go together", file=sys.stderr)
            return 2
        curve = (args.curve_secret, args.broker_key) if args.curve_secret else None
        if curve is not None and _unreadable_keys("status", *curve):
            return 2
        try:
            return show_status(args.broker, curve, args.json)
        except BrokenPipeError:  # `envfarm status | head`: the reader has seen enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            return 0
    if args.command == "keygen":
        from envfarm.transport.curve import keygen

        for name in args.names:
            try:
                public, secret = keygen(args.directory, name, args.owner)
            except (OSError, ValueError) as e:
                hint = (
                    " (only root may give files to another user: or run the containers as yours, ENVFARM_UID=$(id -u))"
                    if isinstance(e, PermissionError) and args.owner
                    else ""
                )
                print(f"envfarm keygen: {name}: {e}{hint}", file=sys.stderr)
                return 2
            owner = f", owned by uid {args.owner[0]}" if args.owner else ""
            print(f"wrote {public} (share it) and {secret} (keep it private{owner})")
        return 0
    if args.command == "tune":
        from envfarm.tune import main as tune_main

        return tune_main(args)
    if args.command == "bench":
        from envfarm.bench import main as bench_main

        return bench_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
