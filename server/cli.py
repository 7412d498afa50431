"""The ``fedfuse`` command: one entry point, one subcommand per job.

Bad input (data, configuration, or a path the system refuses) ends with a one-line
``fedfuse: error: ...`` on stderr and exit code 2; Ctrl-C and SIGTERM end with one line saying
how to resume; anything else is a bug and keeps its traceback. :data:`EXIT_CODES` lists them.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from common.config import load_config
from common.errors import ConfigError, FedFuseError, Stopped
from server.federation.run_record import CONFIG_FILE, check_finished

# docs/exit-codes.md shows the same table
EXIT_CODES = """exit codes:
  0    done
  1    audit: flags raised (any other command: a bug, shown with its traceback)
  2    bad input: data, configuration, arguments, or a path that cannot be read or written
       (one line on stderr: fedfuse: error: ...)
  130  stopped by Ctrl-C (SIGINT); the line says how to resume
  141  the reader of the output went away (e.g. `| head`); nothing more is printed
  143  stopped by SIGTERM; the line says how to resume"""


def _data_prepare(args: argparse.Namespace) -> None:
    from common.dataset_summary import describe
    from common.movielens import build_ml1m, build_ml100k
    from common.platform_data import path_error, read_dataset
    from common.platform_writer import write_dataset
    from common.synthetic import SyntheticConfig, generate

    if args.dataset == "ml100k":
        tables = build_ml100k()
    elif args.dataset == "ml1m":
        tables = build_ml1m()
    else:
        tables = generate(
            SyntheticConfig(
                platforms=args.platforms,
                users=args.users,
                items=args.items,
                interactions_per_user=args.interactions_per_user,
                overlap=args.overlap,
                implicit=args.implicit,
                seed=args.seed,
            )
        )
    try:
        out = write_dataset(args.out, tables, force=args.force)
    except OSError as err:  # a read-only or full disk: the user's to fix, not a bug
        raise path_error(args.out, "write", err) from None
    del tables  # ML-1M's million rows would otherwise stay in memory beside the re-read data
    platforms = read_dataset(out)
    print(f"wrote {len(platforms)} platforms to {out}\n")
    print(describe(platforms, load_config(args.config, args.set).task))


def _data_check(args: argparse.Namespace) -> None:
    from common.dataset_summary import describe
    from common.platform_data import read_dataset
    from common.task import check_ranking_cases

    config = load_config(args.config, args.set)
    platforms = read_dataset(args.path)
    # checked against a run configuration, data simulate would refuse is refused here too;
    # without one, only the data itself is checked (a small valid export stays valid)
    if (args.config or args.set) and config.federation.fraction_evaluate > 0:
        check_ranking_cases(args.path, platforms, config.task, config.federation.eval_split)
    for platform in platforms:
        for warning in platform.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    print(f"ok: {len(platforms)} platform(s) valid under {args.path}\n")
    print(describe(platforms, config.task))


def _simulate(args: argparse.Namespace) -> None:
    from server.federation.run_record import RunRecord
    from server.simulation.simulation import (
        check_resources,
        prepare_run,
        resume_settings,
        simulate,
    )

    if args.resume:
        if args.name:
            raise FedFuseError("--resume continues a run in its folder: drop --name")
        record = RunRecord(args.resume)
        record.read_config()  # a clear error for a folder that is not a run
        if args.config or args.set:  # applied to the recorded settings unless a file is given
            recorded = record.root / CONFIG_FILE
            resume_settings(record, load_config(args.config or recorded, args.set))
    else:
        config = load_config(args.config, args.set)
        check_resources(args.cpus_per_client, args.gpus_per_client, config.train.device)
        record = prepare_run(config, Path(args.runs), args.name)
    final = simulate(record, args.cpus_per_client, args.gpus_per_client)
    if args.side_by_side:
        from server.simulation.joining import side_by_side

        print(side_by_side(final), flush=True)
    print(f"finished: {final}")


def _output_folder(out: Path) -> None:
    """Create a command's output folder first: one that cannot be written fails before any
    work, in one line naming it."""
    from common.platform_data import path_error

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise path_error(out, "create the output folder", err) from None


def _compare(args: argparse.Namespace) -> None:
    import shlex

    from server.simulation.baselines import Scoring
    from server.simulation.compare import compare, parse_levels
    from server.simulation.simulation import check_resources

    command = shlex.join(["fedfuse", *sys.argv[1:]])
    if args.frozen or args.runs is not None or args.rescore or args.blend:
        check_resources(args.cpus_per_client, 0.0)
        _compare_frozen(args, command)
        return
    cells = parse_levels(args.epsilon or ["8"])
    config = load_config(args.config, args.set)
    check_resources(args.cpus_per_client, 0.0, config.train.device)
    out = Path(args.out)
    _output_folder(out)
    scoring = Scoring(args.split, args.test_cases)
    from server.simulation.frozen import WARNING, mark_unfrozen

    if args.split == "test":  # settings not chosen by fedfuse tune: said once, and marked
        print(WARNING, file=sys.stderr)
    text = compare(config, cells, out, scoring, command, args.cpus_per_client)
    print(mark_unfrozen(out) if args.split == "test" else text)
    print(f"written: {out / 'comparison.md'}, {out / 'comparison.json'}, {out / 'ndcg_at_10.png'}")


def _compare_frozen(args: argparse.Namespace, command: str) -> None:
    """``compare --frozen``: methods, levels and settings come from the frozen files, so an
    option that would choose them here is refused rather than silently ignored."""
    from pathlib import Path

    from server.simulation.baselines import Scoring
    from server.simulation.frozen import compare_frozen

    if not args.frozen:
        raise FedFuseError("--runs, --rescore and --blend go with --frozen (otherwise: METHOD*N)")
    options = (("--config", args.config), ("--set", args.set), ("--epsilon", args.epsilon))
    given = [name for name, value in options if value]
    if given:
        raise FedFuseError(
            f"--frozen: drop {', '.join(given)}: methods, levels and settings come from the "
            "frozen files (runs per file: --runs N)"
        )
    out = Path(args.out)
    _output_folder(out)
    scoring = Scoring(args.split, args.test_cases)
    frozen = [Path(p) for p in args.frozen]
    runs = 1 if args.runs is None else args.runs
    text = compare_frozen(
        frozen, runs, out, scoring, command, args.cpus_per_client, args.rescore, blends=args.blend
    )
    print(text)
    print(f"written: {out / 'comparison.md'}, {out / 'comparison.json'}, {out / 'ndcg_at_10.png'}")


def _tune(args: argparse.Namespace) -> None:
    import shlex

    from server.simulation.compare import parse_levels
    from server.simulation.simulation import check_resources
    from server.simulation.tuning import read_grid, tune

    check_resources(args.cpus_per_client, 0.0)

    specs = [f"{level}:popularity" for level in args.epsilon or ["8"]]  # levels alone
    levels = [cell.epsilon for cell in parse_levels(specs)]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    grid = read_grid(args.grid, methods, args.config, args.set)
    command = shlex.join(["fedfuse", *sys.argv[1:]])
    out = Path(args.out)
    _output_folder(out)
    cases, cpus, unequal = args.valid_cases, args.cpus_per_client, args.allow_unequal
    print(tune(grid, levels, args.runs, out, command, cases, cpus, allow_unequal=unequal))
    print(f"written: {out / 'tuning.md'}, {out / 'frozen'}/")


def release_of(specs: list[str]) -> dict[str, str] | None:
    """``--release``: the code every platform must have run, as KEY=VALUE pairs of its
    recorded identity (``source_sha256``, ``torch``, ``opacus``, ``flwr``) or ``installed``
    (the identity of the code this audit runs from)."""
    if not specs:
        return None
    from client.step_check import code_identity

    release: dict[str, str] = {}
    for spec in specs:
        if spec == "installed":
            release |= code_identity()
            continue
        key, equals, value = spec.partition("=")
        if not equals or not key or not value:
            raise ConfigError(
                f"--release {spec!r}: expected KEY=VALUE (e.g. torch=2.13.0) or 'installed'"
            )
        release[key] = value
    return release


def _audit(args: argparse.Namespace) -> None:
    from pathlib import Path

    from server.audit.audit import audit, write_audit
    from server.audit.audit_report import summary_text

    report = audit(
        Path(args.run_dir),
        [Path(p) for p in args.platform_state],
        args.white_box,
        release_of(args.release),
    )
    written = write_audit(report, args.run_dir)
    print(summary_text(report))
    print(f"\nwritten: {written[0]}, {written[1]}")
    if report["flags"]:
        raise SystemExit(1)  # flags are findings, not bad input: exit 1, distinct from 2


def _recommend(args: argparse.Namespace) -> None:
    import json

    from server.serving.recommender import Recommender

    if bool(args.user) == bool(args.history):
        raise FedFuseError("give either --user or --history")
    recommender = Recommender(args.run_dir, args.platform, args.platform_state)
    if args.json:
        document = recommender.document(args.user, args.history, args.k)
        print(json.dumps(document, indent=2, ensure_ascii=False))
        return
    shown, recommendations = recommender.request(args.user, args.history, args.k)
    who = f"user {args.user}" if args.user else "the liked titles given"
    print(f"Top {len(recommendations)} on {args.platform} for {who}")
    liked = "; ".join(
        recommender.title(h) + ("" if h.row is not None else " (from elsewhere)") for h in shown
    )
    print(f"history, newest first: {liked or '(none: popularity only)'}\n")
    for rank, item in enumerate(recommendations, start=1):
        print(f"{rank:2d}. {item.title}  [score {item.score:.3f}]")
        print(f"    {item.explanation()}")


def _serve(args: argparse.Namespace) -> None:
    """Checks what can fail fast (the host and --insecure-no-auth, the port) before the run
    is loaded, then the token, then serves until interrupted."""
    import ipaddress
    from pathlib import Path

    from server.serving.access import TOKEN_FILE, Tokens, read_or_create_token
    from server.serving.http_app import LOOPBACK_NAMES, create_app
    from server.serving.listener import is_loopback, listen, serve
    from server.serving.recommender import Recommender

    if args.insecure_no_auth and not is_loopback(args.host):
        raise FedFuseError(
            f"--insecure-no-auth answers anyone who connects: loopback only, not {args.host}"
        )
    sock = listen(args.host, args.port)
    try:
        recommender = Recommender(args.run_dir, args.platform, args.platform_state)
        tokens = None
        if not args.insecure_no_auth:
            path = Path(args.token_file) if args.token_file else recommender.state / TOKEN_FILE
            token, made = read_or_create_token(path)
            print(f"operator token {'made in' if made else 'read from'} {path} (keep it secret)")
            tokens = Tokens(token)
        hosts = [*LOOPBACK_NAMES, *args.allowed_host]
        try:
            wildcard = ipaddress.ip_address(args.host).is_unspecified
        except ValueError:  # a name
            wildcard = False
        if not wildcard and args.host not in hosts:
            hosts.append(args.host)
        app = create_app(recommender, tokens, hosts, openapi=args.openapi)
        size = f"{len(recommender.data.item_text)} items, {len(recommender.users)} users"
        mode = "NO AUTHENTICATION (loopback)" if tokens is None else "bearer tokens"
        print(f"serving {args.platform} ({size}; {mode}) at http://{args.host}:{args.port}/")
        serve(app, sock)
    finally:
        sock.close()


def _config_show(args: argparse.Namespace) -> None:
    print(load_config(args.config, args.set).model_dump_json(indent=2))


def _add_served_platform(parser: argparse.ArgumentParser) -> None:
    """A finished run and the platform whose recommendations it gives (recommend, serve)."""
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--platform", required=True, help="the platform to recommend on")
    parser.add_argument(
        "--platform-state",
        metavar="DIR",
        help="the platform's state folder (default: the run's dp.state_dir/PLATFORM)",
    )


def _add_cpus_option(parser: argparse.ArgumentParser) -> None:
    """Ray CPUs per platform actor. Default: every core, so one actor runs the platforms in
    turn and torch splits each step over all cores. On 2 cores that beats one actor per core
    (a lockstep federated cell took 381 s against 436 s): torch scales a step 1.94x over 2
    threads, while two single-thread actors leave a core idle whenever an odd number of
    platforms train adapters in a round."""
    parser.add_argument(
        "--cpus-per-client",
        type=float,
        default=float(os.cpu_count() or 1),
        help="Ray CPUs per platform actor (default: every core, one actor)",
    )


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run configuration TOML (defaults apply without one)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one configuration value (repeatable)",
    )


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as one line too, like every other error (subcommands' parsers
    are made of this class as well)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"fedfuse: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedfuse",
        description=__doc__.splitlines()[0],
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="prepare and validate platform data").add_subparsers(
        dest="action", required=True
    )
    prepare = data.add_parser("prepare", help="build platforms from an embedded dataset")
    prepare.add_argument("--dataset", choices=["ml100k", "ml1m", "synthetic"], default="ml100k")
    prepare.add_argument(
        "--out", required=True, help="folder to create (one subfolder per platform)"
    )
    prepare.add_argument("--force", action="store_true", help="replace --out if it exists")
    synthetic = prepare.add_argument_group("synthetic dataset")
    synthetic.add_argument("--platforms", type=int, default=3)
    synthetic.add_argument("--users", type=int, default=40, help="users per platform")
    synthetic.add_argument("--items", type=int, default=60, help="items per platform")
    synthetic.add_argument("--interactions-per-user", type=int, default=12)
    synthetic.add_argument("--overlap", type=float, default=0.5)
    synthetic.add_argument("--implicit", action="store_true", help="0/1 labels instead of ratings")
    synthetic.add_argument("--seed", type=int, default=0)
    _add_config_options(prepare)
    prepare.set_defaults(run=_data_prepare)

    check = data.add_parser("check", help="validate a platform folder or a folder of platforms")
    check.add_argument("path")
    _add_config_options(check)
    check.set_defaults(run=_data_check)

    simulate = commands.add_parser(
        "simulate", help="run the federation with Flower's Simulation Engine (Ray actors)"
    )
    _add_config_options(simulate)
    simulate.add_argument("--runs", default="runs", help="folder that holds run folders")
    simulate.add_argument("--name", help="run folder name (default: strategy and time)")
    simulate.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    _add_cpus_option(simulate)
    simulate.add_argument(
        "--gpus-per-client", type=float, default=0.0, help="Ray GPU share per actor (0 = CPU)"
    )
    simulate.add_argument(
        "--no-side-by-side",
        dest="side_by_side",
        action="store_false",
        help="skip the closing table: the platform's in-house model, the federated model and "
        "their blend (trains each platform's BPR and SASRec after the run)",
    )
    simulate.set_defaults(run=_simulate)

    comparison = commands.add_parser(
        "compare",
        help="federated strategies against local, centralized, popularity, the DP prior and BPR",
    )
    _add_config_options(comparison)
    comparison.add_argument(
        "--epsilon",
        action="append",
        metavar="LEVEL[:METHODS]",
        help="privacy level (a target ε, or inf for non-private), optionally with its methods "
        "(comma-separated: popularity, local, centralized, fedavg, ffa, fedsa; default those; "
        "also prior, bpr_local, bpr_pooled and each strategy's ablations STRATEGY_text, "
        "STRATEGY_shared, STRATEGY_user, e.g. fedavg_shared; 'fedavg*3' runs a "
        "cell 3 times); repeatable (default: 8)",
    )
    comparison.add_argument("--out", required=True, help="comparison folder (resumable)")
    comparison.add_argument(
        "--split",
        choices=("test", "valid"),
        default="test",
        help="split every method is scored on: valid to choose a setting, test to report",
    )
    comparison.add_argument(
        "--test-cases", type=int, default=0, help="users scored per platform (0 = all)"
    )
    comparison.add_argument(
        "--frozen",
        nargs="+",
        metavar="FILE",
        help="score exactly these configurations frozen by fedfuse tune (method, level and "
        "settings from each file); a scoring on test is recorded beside each file",
    )
    comparison.add_argument(
        "--runs", type=int, metavar="N", help="with --frozen: runs of each frozen file (default 1)"
    )
    comparison.add_argument(
        "--rescore",
        action="store_true",
        help="with --frozen: score on test again a configuration already scored there "
        "(the report says so)",
    )
    comparison.add_argument(
        "--blend",
        action="store_true",
        help="with --frozen: also each platform's in-house model (its better own BPR or "
        "SASRec) and its blend with each frozen fedavg/local model (weight fitted on valid)",
    )
    _add_cpus_option(comparison)
    comparison.set_defaults(run=_compare)

    tuning = commands.add_parser(
        "tune",
        help="choose each method's settings on the validation split with equal effort, and "
        "freeze the winners for compare --frozen",
    )
    _add_config_options(tuning)
    tuning.add_argument("--grid", required=True, help="grid TOML (docs/protocol.md)")
    tuning.add_argument(
        "--methods", required=True, help="comma-separated methods to tune (compare's names)"
    )
    tuning.add_argument(
        "--epsilon",
        action="append",
        metavar="LEVEL",
        help="privacy level: a target ε, or inf for non-private; repeatable (default: 8)",
    )
    tuning.add_argument("--runs", type=int, default=1, help="runs per configuration (default 1)")
    tuning.add_argument("--out", required=True, help="tuning folder (resumable)")
    tuning.add_argument(
        "--allow-unequal",
        action="store_true",
        help="accept methods with different numbers of configurations (the report says so)",
    )
    tuning.add_argument(
        "--valid-cases", type=int, default=0, help="users scored per platform (0 = all)"
    )
    _add_cpus_option(tuning)
    tuning.set_defaults(run=_tune)

    audit = commands.add_parser(
        "audit", help="check a run's privacy ledgers and wire logs; writes audit.json/.html"
    )
    audit.add_argument("run_dir", metavar="RUN_DIR")
    audit.add_argument(
        "--platform-state",
        action="append",
        default=[],
        metavar="DIR",
        help="a platform's state folder (deployment; repeatable); default RUN_DIR/platform_state/*",
    )
    audit.add_argument(
        "--no-white-box",
        dest="white_box",
        action="store_false",
        help="skip the audit of the DP step itself (gradient canaries through FedFuse's "
        "DP-SGD step at each platform's recorded σ and C, an ε lower bound per platform; "
        "about a second per platform)",
    )
    audit.add_argument(
        "--release",
        action="append",
        default=[],
        metavar="KEY=VALUE|installed",
        help="the code every platform must have run: a recorded identity field "
        "(source_sha256, torch, opacus, flwr; repeatable) or 'installed' (this checkout's); "
        "a platform that recorded other code is flagged",
    )
    audit.set_defaults(run=_audit)

    recommend = commands.add_parser(
        "recommend", help="top-K items for a user of one platform from a finished run, explained"
    )
    _add_served_platform(recommend)
    recommend.add_argument("--user", help="a user of that platform (their history is its data)")
    recommend.add_argument(
        "--history",
        nargs="+",
        metavar="TITLE_OR_ID",
        help="liked items, newest first: this platform's ids or titles, or titles liked on "
        "another platform (cold start; used as text, stored nowhere)",
    )
    recommend.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    recommend.add_argument("--json", action="store_true", help="print JSON instead of text")
    recommend.set_defaults(run=_recommend)

    serve = commands.add_parser(
        "serve", help="one platform's recommendations over HTTP: a JSON API and a page at /"
    )
    _add_served_platform(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port, 1-65535 (default 8000)")
    serve.add_argument(
        "--token-file",
        metavar="FILE",
        help="the operator token (0600; made if missing; default: the platform state folder's "
        "serve.token); user tokens are derived from it (docs/serving.md)",
    )
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="answer every caller as the operator, without a token (loopback hosts only)",
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host header to accept besides 127.0.0.1, localhost and --host "
        "(the name a gateway or browser uses; repeatable)",
    )
    serve.add_argument(
        "--openapi", action="store_true", help="serve the API schema at /openapi.json"
    )
    serve.set_defaults(run=_serve)

    config = commands.add_parser("config", help="inspect the run configuration").add_subparsers(
        dest="action", required=True
    )
    show = config.add_parser("show", help="print the resolved configuration as JSON")
    _add_config_options(show)
    show.set_defaults(run=_config_show)

    from server.deployment.deploy import (
        add_deploy_parser,  # its handlers import their own needs lazily
    )

    add_deploy_parser(commands)
    return parser


class _Console(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout`` is when a record arrives (tests and
    callers may swap it between commands)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            raise  # to main(): the reader went away, not a logging fault to report
        super().handleError(record)


def show_progress() -> None:
    """Library modules log their progress; the command decides it reaches the console, as
    ``[fedfuse] …`` lines on stdout like the command's own."""
    handler = _Console()
    handler.setFormatter(logging.Formatter("[fedfuse] %(message)s"))
    for package in ("common", "client", "server"):
        logger = logging.getLogger(package)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


# Library warnings that tell a FedFuse user nothing they can act on, by category and the start
# of their message: the console's stderr is for errors.
LIBRARY_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # peft 0.21 calls a transformers 5 method that is deprecated but still correct (as in
    # pyproject's pytest filter)
    (FutureWarning, "`is_gradient_checkpointing` is deprecated"),
    # Opacus' reminder that its secure RNG is off: a known limit, docs/privacy.md says why
    (UserWarning, "Secure RNG turned off"),
    # Opacus' RDP accountant: ε at its largest order is still an upper bound
    (UserWarning, "Optimal order is the largest alpha"),
    # torch, in the DP step: the frozen embeddings' outputs need no input gradient
    (UserWarning, "Full backward hook is firing when gradients are computed with respect to"),
    # Ray, starting the simulation engine: a default that changes in a future version
    (FutureWarning, "Tip: In future versions of Ray"),
)


def _quiet_library_warnings() -> None:
    for category, message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", re.escape(message), category)


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signum)


def _resume_hint(args: argparse.Namespace, stopped: Stopped) -> str:
    """How to continue the stopped command, where it can be continued."""
    if args.command == "simulate":
        run = stopped.where or args.resume
        return f"; resume with `fedfuse simulate --resume {run}`" if run else "; nothing started"
    if args.command in ("compare", "tune"):
        return f"; the same command resumes from {args.out}"
    if args.command == "deploy" and args.action == "run":
        return "; a submitted run goes on in the federation (`flwr ls` lists it)"
    return ""


def _stop(args: argparse.Namespace, stopped: Stopped) -> int:
    """One line, then exit 128 + the signal. Flower's ServerApp thread, still waiting for
    replies that will never come, would keep a normal exit waiting forever: ``os._exit``
    then ends the process (every file it wrote was replaced atomically)."""
    code = 128 + stopped.signum
    name = signal.Signals(stopped.signum).name
    print(f"fedfuse: stopped by {name}{_resume_hint(args, stopped)}", file=sys.stderr, flush=True)
    waiting = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if any(not t.daemon for t in waiting):
        try:
            sys.stdout.flush()
        finally:
            os._exit(code)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `fedfuse config show | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 128 + signal.SIGPIPE


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    show_progress()
    _quiet_library_warnings()
    # SIGTERM like Ctrl-C: a line and a resumable run; a caller's handler comes back after
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_stopped) if main_thread else None
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    """The command, its failures turned into one line and an exit code (:data:`EXIT_CODES`)."""
    try:
        if args.command in ("recommend", "serve"):
            check_finished(Path(args.run_dir))
        args.run(args)
        sys.stdout.flush()  # a closed pipe is met here, not in the interpreter's last flush
    except FedFuseError as err:
        print(f"fedfuse: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # pydantic validation of CLI numbers, e.g. --overlap 2
        print(f"fedfuse: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _stop(args, Stopped(signal.SIGINT))
    except Stopped as stopped:
        return _stop(args, stopped)
    except BrokenPipeError:
        raise
    except OSError as err:  # a path the system refuses (read-only, not a folder, disk full)
        if err.filename is None:
            raise
        print(f"fedfuse: error: {os.fsdecode(err.filename)}: {err.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
