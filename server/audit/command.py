"""``fedfuse audit``: its arguments and what it prints (the audit itself is ``audit.py``)."""

from __future__ import annotations

import argparse
from typing import Any

from common.errors import ConfigError


def add_audit_parser(commands: Any) -> None:
    """Registers ``fedfuse audit`` (called by server/cli.py)."""
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
