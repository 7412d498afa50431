"""``fedfuse simulate``, ``compare`` and ``tune``: their arguments and what they print (the
work is ``simulation.py``, ``compare.py``, ``frozen.py`` and ``tuning.py``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from common.config import add_config_options, load_config
from common.errors import FedFuseError
from server.federation.run_record import CONFIG_FILE


def add_simulation_parsers(commands: Any) -> None:
    """Registers ``fedfuse simulate``, ``compare`` and ``tune`` (called by server/cli.py)."""
    simulate = commands.add_parser(
        "simulate", help="run the federation with Flower's Simulation Engine (Ray actors)"
    )
    add_config_options(simulate)
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
    add_config_options(comparison)
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
    add_config_options(tuning)
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


def _simulate(args: argparse.Namespace) -> None:
    from server.federation.report import run_table
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
    print(run_table(RunRecord(final)), flush=True)
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
