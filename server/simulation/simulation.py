"""``fedfuse simulate``: the federation on one machine with Flower's Simulation Engine.

Each platform is a SuperNode whose ClientApp runs in a Ray actor (a separate process); the
ServerApp runs in this process. The run lives in ``RUNS/<name>.incomplete/`` until every
planned round is done, then the folder is renamed to ``RUNS/<name>/``: a folder without the
suffix is always a finished run, and an interrupted one resumes with ``--resume``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from datetime import UTC, datetime
from pathlib import Path

from common.config import RUN_CONFIG_ENV, DPConfig, RunConfig, load_config, with_settings
from common.errors import FedFuseError
from common.platform_data import federation_platforms
from server.federation.report import write_report
from server.federation.run_record import CONFIG_FILE, RunRecord

INCOMPLETE = ".incomplete"
LOG_FILE = "simulation.log"
PLATFORM_STATE = "platform_state"


def check_startable(config: RunConfig) -> None:
    """Everything that can be checked before Ray starts: a bad backbone, data folder, audit
    setting or gradient scale then costs no start-up time and leaves no run folder behind."""
    from client.dp_training import scaled_tensors
    from common.model import resolve_backbone
    from common.sharing import shared_scorer
    from server.audit.canary_audit import check_audit_platform

    resolve_backbone(config.model.backbone)
    federation_platforms(config.data)
    check_audit_platform(config)
    if config.dp.enabled and config.dp.gradient_scales:
        scorer, _ = shared_scorer(config.model, config.lora, config.federation.strategy)
        scaled_tensors(scorer, config.dp.gradient_scales)


def prepare_run(config: RunConfig, runs: Path, name: str | None) -> RunRecord:
    """A new run folder holding the resolved configuration (platform state included).

    The platforms' state (ledgers) goes to ``RUN/platform_state`` unless ``dp.state_dir`` names
    another folder than the default: then that folder is used as given, so a platform's budget
    can span several runs.
    """
    check_startable(config)  # before anything is written
    name = name or f"{config.federation.strategy}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    root = runs / f"{name}{INCOMPLETE}"
    if root.exists() or (runs / name).exists():
        raise FedFuseError(f"{runs / name}: a run of that name exists (use --resume or --name)")
    in_run = config.dp.state_dir == DPConfig.model_fields["state_dir"].default
    state = (root / PLATFORM_STATE if in_run else Path(config.dp.state_dir)).resolve()
    config = with_settings(config, dp={"state_dir": str(state)})
    record = RunRecord(root)
    record.write_config(config.model_dump(mode="json"))
    return record


def simulate(record: RunRecord, cpus_per_client: float = 1.0, gpus_per_client: float = 0.0) -> Path:
    """Run (or resume) the federation recorded in ``record``; returns the finished folder.

    Ray gives each platform's actor its CPUs and GPU share (e.g. 0.5: two actors per GPU) and
    hides GPUs from actors without one; ``train.device = "auto"`` then trains on what it sees.
    The run folder is held by this process throughout (:meth:`RunRecord.owned`).
    """
    with record.owned():
        return _simulate(record, cpus_per_client, gpus_per_client)


@contextmanager
def logs_to(path: Path) -> Iterator[None]:
    """Flower's log, and everything else written to stderr (Ray, library warnings, what Ray
    forwards from the platforms' actors), goes to ``path`` for the duration; the console
    keeps FedFuse's own lines on stdout, one per event."""
    flower = logging.getLogger("flwr")
    consoles = [
        h
        for h in flower.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    saved = os.dup(2)
    sys.stderr.flush()
    with open(path, "a", encoding="utf-8") as log, redirect_stderr(log):
        to_file = logging.StreamHandler(log)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        propagates, flower.propagate = flower.propagate, False  # no second copy via root
        for handler in consoles:
            flower.removeHandler(handler)
        flower.addHandler(to_file)
        os.dup2(log.fileno(), 2)  # also what C code and handlers holding fd 2 write
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            flower.removeHandler(to_file)
            for handler in consoles:
                flower.addHandler(handler)
            flower.propagate = propagates


def _simulate(record: RunRecord, cpus_per_client: float, gpus_per_client: float) -> Path:
    from flwr.simulation import run_simulation

    from client.client_app import app as client_app
    from server.federation.server_app import app as server_app

    config = load_config(record.root / CONFIG_FILE)
    check_startable(config)  # a resumed run's backbone or data may have moved
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ[RUN_CONFIG_ENV] = json.dumps(
        {
            "config-file": str((record.root / CONFIG_FILE).resolve()),
            "run-dir": str(record.root.resolve()),
        }
    )
    platforms = len(federation_platforms(config.data))
    print(
        f"[fedfuse] {platforms} platforms, {config.federation.rounds} rounds, "
        f"strategy {config.federation.strategy}, run folder {record.root}, "
        f"platform state {config.dp.state_dir}; full log in the run folder's {LOG_FILE}",
        flush=True,
    )
    try:
        with logs_to(record.root / LOG_FILE):
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=platforms,
                backend_config={
                    "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
                    "init_args": {"num_cpus": os.cpu_count() or 1},
                },
            )
    except FedFuseError as err:  # one line says why; the folder stays resumable
        raise FedFuseError(
            f"{err}; after fixing it, `fedfuse simulate --resume {record.root}`"
        ) from None
    except Exception:
        print(
            f"[fedfuse] interrupted after round {record.last_round()} (see "
            f"{record.root / LOG_FILE}); continue with `fedfuse simulate --resume {record.root}`",
            file=sys.stderr,
            flush=True,
        )
        raise
    finally:
        del os.environ[RUN_CONFIG_ENV]  # this run's settings must not leak into a later one
    done = record.last_round()
    if done < config.federation.rounds:
        raise FedFuseError(
            f"{record.root}: stopped after round {done} of {config.federation.rounds}; "
            "see the log above, then `fedfuse simulate --resume` continues"
        )
    return finish_run(record)


def finish_run(record: RunRecord) -> Path:
    """After the last round: the canary audit (if asked), the report, then the folder loses its
    ``.incomplete`` suffix and the configuration points at the moved platform state."""
    from server.audit.canary_audit import run_canary_audit

    config = load_config(record.root / CONFIG_FILE)
    if config.audit.canaries:
        done = record.last_round()
        print(run_canary_audit(config, record.root, record.adapter_dir(done)), flush=True)
    print(write_report(record), flush=True)
    final = record.root.with_name(record.root.name.removesuffix(INCOMPLETE))
    if final != record.root:
        record.root.rename(final)
        if Path(config.dp.state_dir) == (record.root / PLATFORM_STATE).resolve():
            state = str((final / PLATFORM_STATE).resolve())
            config = with_settings(config, dp={"state_dir": state})
        RunRecord(final).write_config(config.model_dump(mode="json"))
    return final
