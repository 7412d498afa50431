"""Frozen configurations: what ``fedfuse tune`` chose on validation, scored on test once.

A frozen file (``DIR/frozen/METHOD@LEVEL.json``) holds a method, its privacy level and the
fully resolved configuration that won on the validation split, with a SHA-256 of the three
(canonical JSON), so a file edited after the choice is refused rather than silently scored.
``fedfuse compare --frozen`` scores exactly those configurations and records each scoring on
test in a sidecar beside the file (``METHOD@LEVEL.tested.json``): reading test a second time
for the same hash is how a protocol turns into tuning on test, so it is refused unless asked
for (``--rescore``), and then the report says so. The sidecar is a record, not a lock: a copy
of the frozen file elsewhere has no history; the hash in the report still ties numbers to it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.atomic import atomic_write
from common.config import RunConfig
from common.dataset_summary import markdown_table
from common.errors import ConfigError
from common.sharing import seeded_arrays
from server.simulation import compare as comparison
from server.simulation.baselines import Arrays, Scoring
from server.simulation.comparison_report import report
from server.simulation.joining import INHOUSE, PARTNERS
from server.simulation.methods import METHODS

FORMAT = "fedfuse-frozen/1"
UNFROZEN = "unfrozen: settings not chosen by fedfuse tune"
WARNING = (
    "fedfuse: warning: scoring test with settings not chosen by fedfuse tune (no --frozen); "
    "the report is marked unfrozen"
)
REQUIRED = ("method", "level", "epsilon", "config", "sha256", "frozen_at")


def utc_now() -> str:
    """A UTC timestamp to the second, the form every record here uses."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def config_hash(method: str, level: str, config: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of what was chosen: the same choice, the same hash,
    whatever the file's layout or the other fields (times, validation numbers)."""
    canonical = json.dumps(
        {"method": method, "level": level, "config": config},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def epsilon_text(epsilon: float) -> float | str:
    """ε as JSON can hold it: the number, or ``"inf"`` (strict JSON has no infinity)."""
    return "inf" if math.isinf(epsilon) else epsilon


def freeze(path: Path, method: str, epsilon: float, config: RunConfig, **record: Any) -> dict:
    """Write the frozen file for ``method`` at ``epsilon``; ``record`` adds what led to the
    choice (grid point, overrides, validation numbers). Returns the document written."""
    level = comparison.level_name(epsilon)
    resolved = config.model_dump(mode="json")
    document = {
        "format": FORMAT,
        "method": method,
        "level": level,
        "epsilon": epsilon_text(epsilon),
        "config": resolved,
        **record,
        "frozen_at": utc_now(),
        "sha256": config_hash(method, level, resolved),
    }
    atomic_write(path, json.dumps(document, indent=2) + "\n")
    return document


@dataclass(frozen=True)
class Frozen:
    """A verified frozen file: its choice, parsed, and the document as written."""

    path: Path
    method: str
    epsilon: float
    config: RunConfig
    sha256: str
    document: dict[str, Any]

    @property
    def cell_key(self) -> str:
        return comparison.Cell(self.method, self.epsilon).key


def sidecar_path(path: Path) -> Path:
    """The sidecar that records ``path``'s scorings on test: ``NAME.tested.json``."""
    return path.with_name(f"{path.stem}.tested.json")


def load_frozen(path: Path) -> Frozen:
    """Read and verify a frozen file; any doubt about it is a one-line refusal."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: frozen file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a frozen file (invalid JSON: {err})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a frozen file (written by fedfuse tune, {FORMAT})")
    missing = [key for key in REQUIRED if key not in document]
    if missing:
        raise ConfigError(f"{path}: frozen file lacks {', '.join(missing)}")
    method, level = document["method"], document["level"]
    expected = config_hash(method, level, document["config"])
    if expected != document["sha256"]:
        raise ConfigError(
            f"{path}: hash mismatch: changed after it was frozen (recorded "
            f"{str(document['sha256'])[:12]}…, content {expected[:12]}…); refusing it"
        )
    if method not in METHODS:
        raise ConfigError(f"{path}: unknown method {method!r}")
    epsilon = float(document["epsilon"])
    if comparison.level_name(epsilon) != level:
        raise ConfigError(f"{path}: level {level!r} does not match ε {document['epsilon']!r}")
    try:
        config = RunConfig.model_validate(document["config"])
    except ValueError as err:
        raise ConfigError(f"{path}: config: {' '.join(str(err).split())}") from None
    return Frozen(path, method, epsilon, config, expected, document)


def _history(frozen: Frozen) -> list[dict[str, Any]]:
    sidecar = sidecar_path(frozen.path)
    if not sidecar.exists():
        return []
    entries = json.loads(sidecar.read_text(encoding="utf-8")).get("scorings", [])
    return [e for e in entries if e.get("sha256") == frozen.sha256]


def _earlier(frozen: Frozen, out: Path) -> list[dict[str, Any]]:
    """This hash's earlier scorings on test, except an unfinished one into the same folder
    (an interrupted comparison resumes: its cached cells are the same one look at test)."""
    return [
        e for e in _history(frozen) if e.get("finished_at") or e.get("out") != str(out.resolve())
    ]


def check_test_once(frozen: Sequence[Frozen], out: Path, rescore: bool) -> dict[Path, list]:
    """Refuse a second scoring on test of any frozen hash unless ``rescore``; returns each
    file's earlier scorings (for the report)."""
    earlier = {f.path: _earlier(f, out) for f in frozen}
    for f in frozen:
        if earlier[f.path] and not rescore:
            last = earlier[f.path][-1]
            raise ConfigError(
                f"{f.path}: already scored on test at {last.get('started_at')} into "
                f"{last.get('out')}; test is read once per frozen configuration "
                "(--rescore scores it again, and the report says so)"
            )
    return earlier


def _record_test(frozen: Frozen, out: Path, command: str, rescore: bool, done: bool) -> None:
    """Add (or finish) this scoring's entry in the sidecar: hash, when, where, how."""
    sidecar = sidecar_path(frozen.path)
    document = (
        json.loads(sidecar.read_text(encoding="utf-8"))
        if sidecar.exists()
        else {"frozen": frozen.path.name, "scorings": []}
    )
    entries = document["scorings"]
    where = str(out.resolve())
    open_entry = next(
        (
            e
            for e in entries
            if e.get("sha256") == frozen.sha256
            and e.get("out") == where
            and not e.get("finished_at")
        ),
        None,
    )
    if open_entry is None:
        open_entry = {
            "sha256": frozen.sha256,
            "split": "test",
            "started_at": utc_now(),
            "out": where,
            "command": command,
            "rescore": rescore,
        }
        entries.append(open_entry)
    if done:
        open_entry["finished_at"] = utc_now()
    atomic_write(sidecar, json.dumps(document, indent=2) + "\n")


def _check_folder(frozen: Sequence[Frozen], out: Path, scoring: Scoring) -> None:
    """One folder, one set of frozen hashes, one split: never a mixed report."""
    if (out / "config.json").exists():
        raise ConfigError(f"{out}: holds an unfrozen comparison; use a new --out")
    listed = out / "frozen.json"
    hashes = sorted(f.sha256 for f in frozen)
    if listed.exists() and json.loads(listed.read_text(encoding="utf-8")) != hashes:
        raise ConfigError(f"{listed}: {out} compares other frozen configurations; use a new --out")
    for path in sorted((out / "cells").glob("*.json")):
        scored = json.loads(path.read_text(encoding="utf-8")).get("split", "test")
        if scored != scoring.split:
            raise ConfigError(f"{path}: scored on {scored}; use a new --out")
    atomic_write(listed, json.dumps(hashes) + "\n")


def compare_frozen(
    paths: Sequence[Path],
    runs: int,
    out: Path,
    scoring: Scoring,
    command: str,
    cpus_per_client: float = 1.0,
    rescore: bool = False,
    progress: Callable[[str], None] = print,
    blends: bool = False,
) -> str:
    """Score exactly the frozen configurations (``runs`` runs each, each with its own
    resolved configuration) and write compare's report with a "Frozen configurations"
    section; on test, refuse a second look unless ``rescore``. ``blends``: the in-house model
    and its blends with the frozen partners too (:func:`derived_cells`). Returns the Markdown."""
    if runs < 1:
        raise ConfigError(f"--runs {runs}: runs must be a whole number ≥ 1")
    records = [Path(p) for p in paths if Path(p).name.endswith(".tested.json")]
    if records:  # a shell glob (frozen/*.json) matches the sidecars too
        progress(f"[fedfuse] skipped test records: {', '.join(p.name for p in records)}")
    frozen = [load_frozen(Path(p)) for p in paths if Path(p) not in records]
    if not frozen:
        raise ConfigError("--frozen: no frozen file given (only test records)")
    seen: dict[str, Path] = {}
    for f in frozen:
        if f.cell_key in seen:
            raise ConfigError(f"{f.path}: {f.cell_key} is frozen in {seen[f.cell_key]} too")
        seen[f.cell_key] = f.path
    on_test = scoring.split == "test"
    earlier = check_test_once(frozen, out, rescore) if on_test else {}
    _check_folder(frozen, out, scoring)
    if on_test:
        for f in frozen:
            _record_test(f, out, command, rescore, done=False)
    initial: dict[str, Arrays] = {}
    cells = [
        (f, comparison.Cell(f.method, f.epsilon, k)) for f in frozen for k in range(1, runs + 1)
    ]
    if blends:
        cells += derived_cells(frozen, runs)
    results = []
    for index, (f, cell) in enumerate(cells, start=1):
        path = out / "cells" / f"{cell.key}.json"
        where = f"[fedfuse] cell {index}/{len(cells)} {cell.key}"
        cached = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        if cached.get("frozen", {}).get("sha256") == f.sha256:
            progress(f"{where}: cached")
            result = cached
        else:
            progress(f"{where}: started ({f.path.name}, {f.sha256[:12]})")
            shape = f.config.model.model_dump_json() + f.config.lora.model_dump_json()
            if shape not in initial:  # every method of one model shape starts from one init
                initial[shape] = seeded_arrays(f.config.model, f.config.lora, "fedavg")
            result = comparison.run_cell(
                cell, f.config, initial[shape], out, scoring, cpus_per_client
            )
            result["frozen"] = _summary([f])[0]
            atomic_write(path, json.dumps(result, indent=2) + "\n")
        rescored = bool(earlier.get(f.path))
        results.append(result | {"frozen": result["frozen"] | {"rescored": rescored}})
    report(results, out, command)
    section = frozen_section(frozen, earlier, rescore)
    text = annotate(out, section, top_level={"frozen_configurations": _summary(frozen)})
    if on_test:
        for f in frozen:
            _record_test(f, out, command, rescore, done=True)
    return text


def derived_cells(frozen: Sequence[Frozen], runs: int) -> list[tuple[Frozen, Any]]:
    """Cells that add no setting of their own to frozen ones: each frozen blend partner's
    ``inhouse+PARTNER`` (its configuration, level and runs: it blends that very trained
    model with the in-house one, fitted on validation) and, once, ``popularity`` and
    ``inhouse`` alone."""
    partners = [f for f in frozen if f.method in PARTNERS]
    if not partners:
        raise ConfigError(f"--blend needs a frozen {' or '.join(PARTNERS)} configuration")
    own = next((f for f in frozen if f.method == INHOUSE), None)
    if own is not None:  # the in-house model as tuned, in every blend; scored alone as given
        partners = [with_inhouse(f, own) for f in partners]
    cells = [
        (f, comparison.Cell(f"{INHOUSE}+{f.method}", f.epsilon, k))
        for f in partners
        for k in range(1, runs + 1)
    ]
    alone = [comparison.Cell(m, math.inf) for m in ("popularity", INHOUSE)[: 1 + (own is None)]]
    return [*((partners[0], cell) for cell in alone), *cells]


def with_inhouse(partner: Frozen, own: Frozen) -> Frozen:
    """``partner`` with the frozen in-house model's ``[baselines]``: what its blend runs. Its
    hash covers both choices, so a cached blend of another in-house choice is not reused."""
    for section in ("data", "task"):
        if getattr(partner.config, section) != getattr(own.config, section):
            raise ConfigError(
                f"{own.path}: [{section}] differs from {partner.path}'s; a blend needs both "
                "models on one dataset and task"
            )
    # the blend's in-house model is trained under the partner's configuration, and whether it
    # reads carried histories (sasrec_carried) follows model.carried_history
    if partner.config.model.carried_history != own.config.model.carried_history:
        raise ConfigError(
            f"{own.path}: model.carried_history differs from {partner.path}'s; the in-house "
            "model a blend runs must be the one chosen"
        )
    config = partner.config.model_copy(update={"baselines": own.config.baselines})
    sha256 = hashlib.sha256(f"{partner.sha256}+{own.sha256}".encode()).hexdigest()
    return replace(partner, config=config, sha256=sha256)


def _summary(frozen: Sequence[Frozen]) -> list[dict[str, Any]]:
    return [
        {"file": str(f.path), "sha256": f.sha256, "frozen_at": f.document["frozen_at"]}
        for f in frozen
    ]


def frozen_section(frozen: Sequence[Frozen], earlier: dict[Path, list], rescore: bool) -> list[str]:
    """The report's "Frozen configurations": each file, its hash, when it was frozen, what
    it scored on validation, and whether test had been read for it before."""
    rows = []
    for f in frozen:
        valid = f.document.get("validation", {}).get("mean")
        before = earlier.get(f.path, [])
        rows.append(
            [
                f"`{f.path.name}`",
                f.method,
                f.document["level"],
                f"`{f.sha256}`",
                f.document["frozen_at"],
                "–" if valid is None else f"{valid:.4f}",
                f"**rescored** (scored before {len(before)}×, last at "
                f"{before[-1].get('started_at')})"
                if before
                else "first",
            ]
        )
    lines = [
        "## Frozen configurations\n",
        "Each cell ran the configuration frozen by `fedfuse tune` on the validation split "
        "(its SHA-256 covers method, level and the resolved configuration):\n",
        markdown_table(
            ["file", "method", "level", "sha256", "frozen (UTC)", "valid NDCG@10", "test scoring"],
            rows,
        ),
        "",
    ]
    if rescore and any(earlier.get(f.path) for f in frozen):
        lines += [
            "**Rescored with --rescore**: test had already been read for the configurations "
            "marked above; these numbers are no longer a first look at test.\n"
        ]
    return lines


def annotate(
    out: Path,
    section: Sequence[str],
    per_record: dict[str, Any] | None = None,
    top_level: dict[str, Any] | None = None,
) -> str:
    """Insert ``section`` into comparison.md after its Command line and add ``per_record``
    to each record of comparison.json (``top_level`` too where it is an object, not a list),
    so the report keeps whatever else compare writes; returns the new Markdown."""
    markdown = out / "comparison.md"
    lines = markdown.read_text(encoding="utf-8").split("\n")
    block = "\n".join(section).rstrip("\n")
    if block not in "\n".join(lines):
        at = next((i for i, line in enumerate(lines) if line.startswith("Command:")), 0)
        lines[at + 1 : at + 1] = ["", block] if block else []
    text = "\n".join(lines)
    atomic_write(markdown, text)
    results = out / "comparison.json"
    document = json.loads(results.read_text(encoding="utf-8"))
    if isinstance(document, dict):  # a report that grew beyond a list of records
        document.update((per_record or {}) | (top_level or {}))
    else:
        for record in document:
            record.update(per_record or {})
    atomic_write(results, json.dumps(document, indent=2) + "\n")
    return text


def mark_unfrozen(out: Path) -> str:
    """Mark a test report whose settings were not chosen by ``fedfuse tune``."""
    return annotate(out, [f"**{UNFROZEN}**\n"], per_record={"selection": UNFROZEN})
