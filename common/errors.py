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


class Stopped(BaseException):
    """Ctrl-C (SIGINT) or SIGTERM: a BaseException like KeyboardInterrupt, so that no
    ``except Exception`` on the way (Flower's, Ray's) swallows it. ``where`` names the folder
    the stopped command can resume from, when it has one; the CLI exits 128 + the signal."""

    def __init__(self, signum: int, where: Path | None = None) -> None:
        super().__init__(signum, where)
        self.signum = signum
        self.where = where
