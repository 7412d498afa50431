"""A run's folder on the server side: resolved config, metrics.jsonl, adapters per round.

Layout of ``RUN_DIR``::

    config.json              the resolved run configuration
    run.json                 the run's identity (``run_id``), where its platform state is
                             (``platform_state``: relative to the folder, or an absolute path)
                             and the FedFuse release that made it (``fedfuse``)
    metrics.jsonl            one JSON object per event (train/evaluate per platform and round)
    adapters/round_NNN/      global adapter after round NNN, in peft format (+ FedFuse head)

Every file is replaced atomically (temporary file, then rename), so a crash never leaves a
truncated metrics file or a half-written checkpoint, and a run resumes from its last complete
round.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.atomic import atomic_write
from common.config import RunConfig, load_config
from common.errors import ConfigError, FedFuseError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
ADAPTERS_DIR = "adapters"
ROUND_PATTERN = re.compile(r"^round_(\d{3,})$")
RUN_FILE = "run.json"
LOCK_FILE = ".run.lock"
INCOMPLETE = ".incomplete"  # a run folder's suffix until its last round is done


def release() -> str:
    """The installed FedFuse's version (pyproject.toml's); "unpackaged" where it runs from an
    app bundle without being installed."""
    try:
        return importlib.metadata.version("fedfuse")
    except importlib.metadata.PackageNotFoundError:
        return "unpackaged"


def check_finished(root: Path) -> None:
    """Recommendations come from a finished run (README): an ``.incomplete`` folder holds a
    model trained for fewer rounds than planned, so it is refused rather than served."""
    if root.name.endswith(INCOMPLETE):
        raise FedFuseError(
            f"{root}: the run is not finished; `fedfuse simulate --resume {root}` completes it"
        )


class RunRecord:
    """Reads and appends the files of one run folder."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @contextmanager
    def owned(self) -> Iterator[None]:
        """Hold the run folder for this process: a second ``simulate`` of the same run (two
        ``--resume`` started at once) is refused instead of training every round twice."""
        with open(self.root / LOCK_FILE, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FedFuseError(
                    f"{self.root}: the run is in use by another fedfuse process; "
                    "wait for it to end (one process per run folder)"
                ) from None
            try:
                yield  # if the process dies, closing its files releases the lock
            finally:
                # explicitly: a child forked meanwhile (Ray, Flower) shares this open file
                # and would otherwise keep the lock after the run ended
                fcntl.flock(lock, fcntl.LOCK_UN)

    def identity(self) -> dict[str, str]:
        """``run_id`` and ``platform_state`` from run.json ({} for a folder without one)."""
        path = self.root / RUN_FILE
        if not path.exists():
            return {}
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise FedFuseError(f"{path}: invalid JSON ({err})") from None
        if not isinstance(document, dict) or not isinstance(document.get("run_id"), str):
            raise FedFuseError(f"{path}: not a FedFuse run identity (no 'run_id')")
        return {str(k): str(v) for k, v in document.items()}

    def write_identity(self, platform_state: str, run_id: str | None = None) -> None:
        """Name the run (a new id unless given), where its platform state lies and the release
        that made it (what reads an older folder's settings names it: :meth:`run_config`)."""
        document = {
            "run_id": run_id or uuid.uuid4().hex,
            "platform_state": platform_state,
            "fedfuse": release(),
        }
        atomic_write(self.root / RUN_FILE, json.dumps(document, indent=2) + "\n")

    def run_id(self) -> str:
        """The id every ledger entry of this run carries: a copied or moved folder keeps it,
        so its rounds are recognised as this run's (a folder made by hand gets one now)."""
        identity = self.identity()
        if not identity:
            state = self.read_config().get("dp", {}).get("state_dir", "")
            self.write_identity(str(state))
            identity = self.identity()
        return identity["run_id"]

    def adapter_dir(self, server_round: int) -> Path:
        return self.root / ADAPTERS_DIR / f"round_{server_round:03d}"

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write(self.root / CONFIG_FILE, json.dumps(config, indent=2) + "\n")

    def run_config(self) -> RunConfig:
        """The run's settings, validated. A folder an older release wrote may hold settings
        this one retired (a scorer, an objective): the error then names both releases."""
        try:
            return load_config(self.root / CONFIG_FILE)
        except ConfigError as err:
            made = self.identity().get("fedfuse")
            if made == release():
                raise
            wrote = f"FedFuse {made}" if made else "a FedFuse release that did not record itself"
            raise ConfigError(
                f"{err}; this run folder was written by {wrote} and this is FedFuse {release()} "
                "(CHANGELOG.md says what changed): read it with the release that wrote it"
            ) from None

    def read_config(self) -> dict[str, Any]:
        path = self.root / CONFIG_FILE
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FedFuseError(f"{path}: not a FedFuse run folder (no {CONFIG_FILE})") from None
        except json.JSONDecodeError as err:
            raise FedFuseError(f"{path}: invalid JSON ({err})") from None

    def events(self) -> list[dict[str, Any]]:
        path = self.root / METRICS_FILE
        if not path.exists():
            return []
        events = []
        for row, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise FedFuseError(f"{path}, row {row}: invalid JSON ({err.msg})") from None
        return events

    def append(self, events: list[dict[str, Any]]) -> None:
        """Add events to metrics.jsonl (rewritten atomically: it stays small)."""
        lines = [json.dumps(e, allow_nan=True) for e in [*self.events(), *events]]
        atomic_write(self.root / METRICS_FILE, "\n".join(lines) + "\n")

    def last_round(self) -> int:
        """Highest round with a complete checkpoint (0 if none)."""
        folder = self.root / ADAPTERS_DIR
        rounds = [
            int(match.group(1))
            for child in (folder.iterdir() if folder.is_dir() else [])
            if (match := ROUND_PATTERN.match(child.name))
        ]
        return max(rounds, default=0)
