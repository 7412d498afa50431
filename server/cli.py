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
from typing import TYPE_CHECKING, NoReturn

from common.config import add_config_options, load_config
from common.errors import DataError, FedFuseError, Stopped
from server.audit.command import add_audit_parser
from server.federation.run_record import check_finished
from server.serving.commands import add_serving_parsers
from server.simulation.commands import add_simulation_parsers

if TYPE_CHECKING:
    from common.config import RunConfig, TaskConfig
    from common.platform_data import PlatformData

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

    config = load_config(args.config, args.set)  # bad settings are refused before any writing
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
    print(describe(platforms, _summary_task(config, bool(args.config or args.set), platforms)))


def _data_check(args: argparse.Namespace) -> None:
    from common.dataset_summary import describe
    from common.platform_data import read_dataset
    from common.task import check_ranking_cases

    config = load_config(args.config, args.set)
    platforms = read_dataset(args.path)
    configured = bool(args.config or args.set)
    task = _summary_task(config, configured, platforms)
    notes = [w for platform in platforms for w in platform.warnings]
    # data simulate would refuse is refused under a run configuration; without one the files
    # alone are checked (a small valid export stays valid) and the same finding is a warning
    # about the split the summary shows (the default at the data's own cuts)
    if config.federation.fraction_evaluate > 0:
        try:
            check_ranking_cases(args.path, platforms, task, config.federation.eval_split)
        except DataError as err:
            if configured:
                raise
            notes.append(f"{err}; a run on the split below would refuse this data")
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    print(f"ok: {len(platforms)} platform(s) valid under {args.path}\n")
    print(describe(platforms, task))


def _summary_task(config: RunConfig, configured: bool, platforms: list[PlatformData]) -> TaskConfig:
    """The split a data summary is shown under: the run configuration's when one is given
    (``configured``), else the default split at this data's own cut times."""
    from common.dataset_summary import own_cuts

    return config.task if configured else own_cuts(platforms, config.task)


def _config_show(args: argparse.Namespace) -> None:
    print(load_config(args.config, args.set).model_dump_json(indent=2))


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
    add_config_options(prepare)
    prepare.set_defaults(run=_data_prepare)

    check = data.add_parser("check", help="validate a platform folder or a folder of platforms")
    check.add_argument("path")
    add_config_options(check)
    check.set_defaults(run=_data_check)

    add_simulation_parsers(commands)
    add_audit_parser(commands)
    add_serving_parsers(commands)

    config = commands.add_parser("config", help="inspect the run configuration").add_subparsers(
        dest="action", required=True
    )
    show = config.add_parser("show", help="print the resolved configuration as JSON")
    add_config_options(show)
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
