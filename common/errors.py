"""Errors a user can act on: each renders as one line naming the file, row and column."""

from __future__ import annotations

from pathlib import Path


class FedFuseError(Exception):
    """Bad input from the user; the CLI prints it on one line and exits with code 2."""


class DataError(FedFuseError):
    """A problem in a platform's data files, located as precisely as the format allows.

    ``row`` is the 1-based line number in the file as an editor shows it (the header is line 1
    for CSV/TSV), so a user can jump straight to it.
    """

    def __init__(
        self,
        path: Path | str,
        message: str,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.row = row
        self.column = column
        self.message = message
        where = [str(self.path)]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {' '.join(message.split())}")


class ConfigError(FedFuseError):
    """A problem in a run configuration file or a command-line override."""
