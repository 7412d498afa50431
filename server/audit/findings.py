"""What every check of ``fedfuse audit`` returns and reads: a flag, and a JSON file whose
trouble is one line (the run cannot be audited) rather than a flag."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.errors import FedFuseError


def flag(code: str, platform: str | None, message: str) -> dict[str, Any]:
    return {"code": code, "platform": platform, "message": message}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedFuseError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FedFuseError(f"{path}: not valid JSON ({err})") from None
