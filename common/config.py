"""The one typed run configuration: a TOML file plus ``section.key=value`` overrides.

Sections mirror the code that reads them (``[data]``, ``[task]``, ``[model]``, ``[lora]``,
``[train]``); each is a frozen pydantic model that rejects unknown keys and bad values, so a
typo fails at start-up with the key's full name instead of being silently ignored. The
sections' models are defined in ``common/config_sections.py`` (what a run trains) and
``common/config_checks.py`` (what checks or compares it); this module puts them together
(:class:`RunConfig`), loads and overrides them, and is where the rest of the code imports any
of them from.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.config_checks import AuditConfig, BaselineConfig
from common.config_sections import (
    DataConfig,
    DPConfig,
    FederationConfig,
    LoraSettings,
    ModelConfig,
    PriorConfig,
    TaskConfig,
    TrainConfig,
)
from common.errors import ConfigError


class RunConfig(BaseModel):
    """Everything a FedFuse run needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: DataConfig = Field(default_factory=DataConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainConfig = Field(default_factory=TrainConfig)
    dp: DPConfig = Field(default_factory=DPConfig)
    prior: PriorConfig = Field(default_factory=PriorConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    baselines: BaselineConfig = Field(default_factory=BaselineConfig)

    @model_validator(mode="after")
    def _trainable(self) -> RunConfig:
        if self.objective == "softmax" and self.task.negatives_per_positive == 0:
            raise ValueError("train.objective 'softmax' needs task.negatives_per_positive >= 1")
        if self.federation.secure_aggregation and not self.dp.enabled:
            raise ValueError(
                "federation.secure_aggregation needs dp.enabled = true: its range comes from "
                "the clip norm, which only DP training applies"
            )
        return self

    @property
    def objective(self) -> str:
        """The training objective (``train.objective``)."""
        return self.train.objective


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    more = len(error.errors()) - 1
    tail = f" (and {more} more problems)" if more else ""
    if first["type"] == "value_error":
        # a rule across keys (a validator): its message names the keys itself
        return f"{source}: {first['msg'].removeprefix('Value error, ')}{tail}"
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
    got = "" if first["type"] == "missing" else f" (got {first['input']!r})"
    return f"{source}: {key}: {message}{got}{tail}"


def _parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value``; the value is read as TOML, falling back to a bare string."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def with_settings(config: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """``config`` with some fields of some sections replaced, e.g. ``dp={"enabled": False}``."""
    return config.model_copy(
        update={
            name: getattr(config, name).model_copy(update=fields)
            for name, fields in sections.items()
        }
    )


def load_config(
    path: Path | str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Read ``path`` (or start from defaults), apply overrides, validate everything at once."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
            # A run folder's resolved config.json is accepted too (resume, Flower apps).
            raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"{path}: configuration file not found") from None
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(
                f"{path}: invalid {path.suffix[1:].upper() or 'TOML'}: {err}"
            ) from None
    for text in overrides:
        parts, value = _parse_override(text)
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[parts[-1]] = value
    if overrides:
        source += " + overrides"
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """A command's ``--config FILE`` and repeatable ``--set SECTION.KEY=VALUE``, as
    :func:`load_config` takes them."""
    parser.add_argument("--config", help="run configuration TOML (defaults apply without one)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one configuration value (repeatable)",
    )


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " or ".join(repr(choice) for choice in get_args(annotation))
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def config_reference() -> str:
    """Markdown table of every key, its type, default and meaning (README's reference)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for section, field in RunConfig.model_fields.items():
        model: type[BaseModel] = field.annotation  # type: ignore[assignment]
        for name, info in model.model_fields.items():
            default = info.get_default(call_default_factory=True)
            cells = [f"`{section}.{name}`", _type_name(info.annotation), f"`{default!r}`"]
            cells.append(info.description or "")
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _flower_overrides(settings: dict[str, Any]) -> list[str]:
    """``section.key`` entries of a Flower run or node config as TOML overrides."""
    out = []
    for key, value in settings.items():
        if "." in key:
            literal = str(value).lower() if isinstance(value, bool) else repr(value)
            out.append(f"{key}={literal}")
    return out


def run_configuration(
    run_config: dict[str, Any], node_config: dict[str, Any] | None = None
) -> RunConfig:
    """The configuration a Flower app runs with: ``config-file`` from the run config, then its
    ``section.key`` overrides, then the node's (a platform's own settings win)."""
    run_config = flower_run_config(run_config)
    overrides = _flower_overrides(run_config) + _flower_overrides(node_config or {})
    return load_config(_in_app(run_config.get("config-file")), overrides)


APP_DIR = Path(__file__).resolve().parents[1]


def _in_app(config_file: str | None) -> str | None:
    """A relative ``config-file`` names a file inside the app: Flower ships the app's TOML
    files to every SuperNode, while each process's working directory differs per machine."""
    if config_file and not Path(config_file).is_absolute() and (APP_DIR / config_file).exists():
        return str(APP_DIR / config_file)
    return config_file


RUN_CONFIG_ENV = "FEDFUSE_RUN_CONFIG"


def flower_run_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """The Flower run config, or (when it is empty) the JSON in ``$FEDFUSE_RUN_CONFIG``.

    Flower's Python simulation API gives apps an empty run config; ``fedfuse simulate`` sets
    the variable before starting it, and the Ray actors inherit the environment.
    """
    if run_config or RUN_CONFIG_ENV not in os.environ:
        return dict(run_config)
    return json.loads(os.environ[RUN_CONFIG_ENV])
