"""Writing platforms in the native format (what ``fedfuse data prepare`` produces)."""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import DataError
from common.platform_format import CARRIED, INTERACTIONS, ITEMS


@dataclass(frozen=True)
class PlatformTables:
    """Rows to write for one platform, in the native format (see :func:`write_dataset`)."""

    name: str
    interactions: Sequence[Mapping[str, object]]
    items: Sequence[Mapping[str, object]]
    carried: PlatformTables | None = None  # written to the platform's CARRIED/ subfolder


def _write_tsv(path: Path, rows: Sequence[Mapping[str, object]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)


def write_dataset(
    out: Path | str, platforms: Sequence[PlatformTables], force: bool = False
) -> Path:
    """Write platforms as TSV folders under ``out``, all or nothing.

    Everything goes to a temporary sibling folder that is renamed into place at the end, so an
    interrupted run never leaves a half-written dataset behind.
    """
    out = Path(out)
    for platform in platforms:
        if not platform.items or not platform.interactions:
            raise DataError(out / platform.name, "platform has no items or no interactions")
    if out.exists() and not force:
        raise DataError(out, "already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for platform in platforms:
            folder = staging / platform.name
            folder.mkdir()
            _write_tsv(folder / f"{ITEMS}.tsv", platform.items)
            _write_tsv(folder / f"{INTERACTIONS}.tsv", platform.interactions)
            if platform.carried is not None and platform.carried.interactions:
                (folder / CARRIED).mkdir()
                _write_tsv(folder / CARRIED / f"{ITEMS}.tsv", platform.carried.items)
                _write_tsv(folder / CARRIED / f"{INTERACTIONS}.tsv", platform.carried.interactions)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(staging, out)
            shutil.rmtree(trash)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
