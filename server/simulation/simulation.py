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
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.config import RUN_CONFIG_ENV, DPConfig, RunConfig, with_settings
from common.errors import ConfigError, FedFuseError, Stopped
from common.platform_data import federation_platforms, path_error, read_platform
from common.task import check_ranking_cases
from server.federation.report import write_report
from server.federation.run_record import CONFIG_FILE, INCOMPLETE, METRICS_FILE, RunRecord

LOG_FILE = "simulation.log"
PLATFORM_STATE = "platform_state"


# settings a resumed run may change: where things are and what runs it, never what the
# platforms' ledgers were charged for (rounds, σ, data sampling, model shapes)
RESUMABLE = ("data.path", "model.backbone", "train.device")

log = logging.getLogger(__name__)


def check_resources(cpus_per_client: float, gpus_per_client: float, device: str = "auto") -> None:
    """Ray waits forever for an actor that cannot fit and finds a missing GPU only inside an
    actor, minutes later: such settings are refused before Ray starts."""
    cores = os.cpu_count() or 1
    if not 0 < cpus_per_client <= cores:
        raise ConfigError(
            f"--cpus-per-client {cpus_per_client:g}: give a share above 0 and at most this "
            f"machine's {cores} CPUs (an actor that cannot fit would wait forever)"
        )
    if gpus_per_client < 0 or (gpus_per_client > 1 and not float(gpus_per_client).is_integer()):
        raise ConfigError(
            f"--gpus-per-client {gpus_per_client:g}: give 0 (CPU), a share up to 1, or whole GPUs"
        )
    if gpus_per_client == 0 and device != "cuda":
        return
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus_per_client > gpus:
        raise ConfigError(
            f"--gpus-per-client {gpus_per_client:g}: this machine has {gpus} CUDA GPU(s) "
            "(use 0 to train on the CPU)"
        )
    if device == "cuda" and not gpus:
        raise ConfigError("train.device = cuda: no CUDA GPU is visible (use auto or cpu)")
    if device == "cuda" and gpus_per_client == 0:
        raise ConfigError(
            "train.device = cuda needs --gpus-per-client above 0 (Ray hides the GPUs from "
            "actors without a share)"
        )


def check_startable(config: RunConfig) -> None:
    """Everything that can be checked before Ray starts: a bad backbone, data folder, audit
    setting or gradient scale, a node count Flower would wait for forever, or a split with
    nothing to evaluate then costs no start-up time and leaves no run folder behind."""
    from client.gradient_rows import scaled_tensors
    from common.backbone import resolve_backbone
    from common.sharing import shared_scorer
    from server.audit.canary_audit import check_audit_platform

    resolve_backbone(config.model.backbone)
    platforms = federation_platforms(config.data)
    federation = config.federation
    if federation.min_nodes > len(platforms):
        raise ConfigError(
            f"federation.min_nodes = {federation.min_nodes} but {config.data.path} holds "
            f"{len(platforms)} platform(s): no round could start (set it to at most "
            f"{len(platforms)})"
        )
    if federation.fraction_evaluate > 0:
        data = [read_platform(folder, name) for name, folder in platforms]
        check_ranking_cases(config.data.path, data, config.task, federation.eval_split)
    check_audit_platform(config)
    if config.dp.enabled and config.dp.gradient_scales:
        scorer, _ = shared_scorer(config.model, config.lora, config.federation.strategy)
        scaled_tensors(scorer, config.dp.gradient_scales)


def prepare_run(config: RunConfig, runs: Path, name: str | None) -> RunRecord:
    """A new run folder holding the resolved configuration (platform state included).

    The platforms' state (ledgers) goes to ``RUN/platform_state`` unless ``dp.state_dir`` names
    another folder than the default: then that folder is used as given, so a platform's budget
    can span several runs. run.json records the run's id and the state folder, relative to the
    run folder when it is inside it: a moved or copied folder finds its own ledgers.
    """
    if name is not None and (not name or "/" in name or "\0" in name or name in (".", "..")):
        raise ConfigError(
            f"--name {name!r}: give a plain folder name (no '/', not '.' or '..'); the run "
            "folder is always created under --runs"
        )
    check_startable(config)  # before anything is written
    name = name or f"{config.federation.strategy}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    root = runs / f"{name}{INCOMPLETE}"
    if root.exists() or (runs / name).exists():
        raise FedFuseError(f"{runs / name}: a run of that name exists (use --resume or --name)")
    in_run = config.dp.state_dir == DPConfig.model_fields["state_dir"].default
    state = (root / PLATFORM_STATE if in_run else Path(config.dp.state_dir)).resolve()
    config = with_settings(config, dp={"state_dir": str(state)})
    record = RunRecord(root)
    try:
        root.mkdir(parents=True)
    except OSError as err:  # a read-only, missing or non-folder --runs: before anything else
        raise path_error(runs, "create the run folder", err) from None
    record.write_config(config.model_dump(mode="json"))
    record.write_identity(PLATFORM_STATE if in_run else str(state))
    return record


def locate_state(record: RunRecord) -> RunConfig:
    """The run's configuration with ``dp.state_dir`` where run.json says the platform state
    is now: inside this folder (wherever the folder was moved or copied), or the absolute
    folder it names. A folder from before run.json is read as inside if its recorded state
    folder was."""
    config = record.run_config()
    identity = record.identity()
    if not identity:
        inside = Path(config.dp.state_dir) == (record.root / PLATFORM_STATE).resolve()
        record.write_identity(PLATFORM_STATE if inside else config.dp.state_dir)
        identity = record.identity()
    state = (record.root / identity["platform_state"]).resolve()  # an absolute one stays
    if str(state) != config.dp.state_dir:
        config = with_settings(config, dp={"state_dir": str(state)})
        record.write_config(config.model_dump(mode="json"))
        log.info("platform state of this run folder: %s", state)
    return config


def check_ledgers(record: RunRecord, config: RunConfig) -> None:
    """Refuse to resume a DP run whose platforms' ledgers do not hold what the run charged.

    metrics.jsonl names every round a platform answered with a DP update and the ε it
    reported. Each such platform's ledger must exist, be that platform's, hold those rounds
    (for this run), and show at least that ε; a ledger holding rounds of this run past the
    next one means another copy of the run went on. Otherwise a missing ledger would be
    created afresh and the data trained on a budget that ignores what it already spent.
    """
    from client.ledger import LEDGER_FILE, PRV_RELATIVE_ERROR, PrivacyLedger

    if not config.dp.enabled:
        return
    run_id = record.run_id()
    charged: dict[str, set[int]] = {}
    reported: dict[str, float] = {}
    for event in record.events():
        if event.get("event") != "train" or event.get("status") != "ok":
            continue
        if "noise-multiplier" not in event:  # no DP step that round (lockstep, not due)
            continue
        platform = str(event.get("platform"))
        charged.setdefault(platform, set()).add(int(event["round"]))
        reported[platform] = max(reported.get(platform, 0.0), float(event["epsilon"]))
    done = record.last_round()
    for platform, rounds in sorted(charged.items()):
        path = Path(config.dp.state_dir) / platform / LEDGER_FILE
        where = f"--resume {record.root}: platform {platform!r}"
        if not path.exists():
            raise FedFuseError(
                f"{where} has no privacy ledger at {path}, yet this run charged it round(s) "
                f"{_rounds(rounds)} ({METRICS_FILE}); put its state folder back (a run never "
                "trains a platform on a fresh ledger)"
            )
        ledger = PrivacyLedger.load(path)
        ours = {e["server_round"] for e in ledger.entries if e.get("run", "") in (run_id, "")}
        if ledger.header.get("platform") != platform or not rounds <= ours:
            raise FedFuseError(
                f"{where}: {path} is not the ledger this run charged (it lacks round(s) "
                f"{_rounds(rounds - ours) or 'none'} or names platform "
                f"{ledger.header.get('platform')!r}); put the platform's own ledger back"
            )
        # PRV's ε is an upper bound computed to 0.5 %: a longer composition can come out a
        # hair lower than a shorter one
        if ledger.spent() < reported[platform] * (1 - 2 * PRV_RELATIVE_ERROR):
            raise FedFuseError(
                f"{where}: {path} records ε = {ledger.spent():.4f}, below the "
                f"{reported[platform]:.4f} the platform reported in this run; put its own "
                "ledger back"
            )
        ahead = {
            e["server_round"]
            for e in ledger.entries
            if e.get("run") == run_id and e["server_round"] > done + 1
        }
        if ahead:
            raise FedFuseError(
                f"{where}: its ledger {path} holds round(s) {_rounds(ahead)} of this run, past "
                f"this folder's last checkpoint (round {done}): another copy of the run went "
                "on; resume that one"
            )


def _rounds(rounds: set[int]) -> str:
    return ", ".join(str(r) for r in sorted(rounds))


def _flat(config: RunConfig) -> dict[str, Any]:
    return {
        f"{section}.{key}": value
        for section, values in config.model_dump(mode="json").items()
        for key, value in values.items()
    }


def resume_settings(record: RunRecord, config: RunConfig) -> None:
    """Apply to a resumed run the settings in ``config`` (its ``--config`` and ``--set``) that
    may change on a resume (:data:`RESUMABLE`); any other change is refused, because the
    ledgers were charged for the recorded ones (and the ledger's folder stays where it is). A
    refusal writes nothing, not even the run's lock file."""
    recorded = record.run_config()
    old, new = _flat(recorded), _flat(config)
    if config.dp.state_dir == DPConfig.model_fields["state_dir"].default:
        new["dp.state_dir"] = old["dp.state_dir"]  # a file's default is no move of the ledgers
    changed = sorted(key for key in old if old[key] != new[key])
    refused = [key for key in changed if key not in RESUMABLE]
    if refused:
        raise ConfigError(
            f"--resume {record.root}: {', '.join(refused)} cannot change on a resume (the "
            f"ledgers were charged for the recorded values); only {', '.join(RESUMABLE)} can"
        )
    if changed:
        sections: dict[str, dict[str, Any]] = {}
        for key in changed:
            section, _, field = key.partition(".")
            sections.setdefault(section, {})[field] = new[key]
        with record.owned():  # never under a process that is running the run
            record.write_config(with_settings(recorded, **sections).model_dump(mode="json"))
        log.info("resuming with %s", ", ".join(f"{key} = {new[key]}" for key in changed))


def simulate(record: RunRecord, cpus_per_client: float = 1.0, gpus_per_client: float = 0.0) -> Path:
    """Run (or resume) the federation recorded in ``record``; returns the finished folder.

    Ray gives each platform's actor its CPUs and GPU share (e.g. 0.5: two actors per GPU) and
    hides GPUs from actors without one; ``train.device = "auto"`` then trains on what it sees.
    The run folder is held by this process throughout (:meth:`RunRecord.owned`).
    """
    config = record.run_config()
    check_resources(cpus_per_client, gpus_per_client, config.train.device)
    with record.owned():
        check_ledgers(record, locate_state(record))
        return _simulate(record, cpus_per_client, gpus_per_client)


@contextmanager
def stoppable(record: RunRecord) -> Iterator[None]:
    """Ctrl-C and SIGTERM become :class:`Stopped` naming the run folder. Ray's driver replaces
    the SIGTERM handler with ``sys.exit(15)``; ours is put back afterwards."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    except KeyboardInterrupt:
        raise Stopped(signal.SIGINT, record.root) from None
    except SystemExit as exit:
        if exit.code != signal.SIGTERM:
            raise
        raise Stopped(signal.SIGTERM, record.root) from None
    except Stopped as stopped:
        raise Stopped(stopped.signum, record.root) from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


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

    config = record.run_config()
    check_startable(config)  # a resumed run's backbone or data may have moved
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ[RUN_CONFIG_ENV] = json.dumps(
        {
            "config-file": str((record.root / CONFIG_FILE).resolve()),
            "run-dir": str(record.root.resolve()),
        }
    )
    platforms = len(federation_platforms(config.data))
    log.info(
        "%d platforms, %d rounds, strategy %s, run folder %s, platform state %s; full log in "
        "the run folder's %s",
        platforms,
        config.federation.rounds,
        config.federation.strategy,
        record.root,
        config.dp.state_dir,
        LOG_FILE,
    )
    try:
        with stoppable(record), logs_to(record.root / LOG_FILE):
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
    except Exception as err:
        if isinstance(err, OSError) and err.filename is not None:  # a full or read-only disk
            raise FedFuseError(
                f"{os.fsdecode(err.filename)}: {err.strerror}; after fixing it, "
                f"`fedfuse simulate --resume {record.root}`"
            ) from None
        log.error(
            "interrupted after round %d (see %s); continue with `fedfuse simulate --resume %s`",
            record.last_round(),
            record.root / LOG_FILE,
            record.root,
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
    """After the last round: the canary audit (if asked), the report (summary.md and its plots;
    the command prints its table), then the folder loses its ``.incomplete`` suffix and the
    configuration points at the moved platform state."""
    from server.audit.canary_audit import run_canary_audit

    config = record.run_config()
    if config.audit.canaries:
        done = record.last_round()
        log.info("%s", run_canary_audit(config, record.root, record.adapter_dir(done)))
    write_report(record)
    final = record.root.with_name(record.root.name.removesuffix(INCOMPLETE))
    if final != record.root:
        record.root.rename(final)
        # config.json keeps an absolute path for its readers; run.json's stays relative
        if RunRecord(final).identity().get("platform_state") == PLATFORM_STATE:
            state = str((final / PLATFORM_STATE).resolve())
            config = with_settings(config, dp={"state_dir": state})
        RunRecord(final).write_config(config.model_dump(mode="json"))
    return final
