"""Run configuration: TOML + overrides, strict validation, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import RunConfig, config_reference, load_config
from common.errors import ConfigError
from server.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_defaults_without_a_file() -> None:
    config = load_config()
    assert config == RunConfig()
    assert config.model.backbone == "default" and config.task.history_len == 20


def test_the_defaults_are_the_measured_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    """`fedfuse simulate` with and without simulations/ml100k_default.toml runs one recipe on
    ML-100K, and `fedfuse config show` prints it."""
    recipe = REPO / "simulations" / "ml100k_default.toml"
    assert load_config(recipe) == load_config() == RunConfig()
    assert main(["config", "show"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert main(["config", "show", "--config", str(recipe)]) == 0
    assert json.loads(capsys.readouterr().out) == shown == RunConfig().model_dump(mode="json")
    assert shown["federation"]["schedule"] == "lockstep" and shown["task"]["history_len"] == 20


def test_leave_last_has_no_cuts_and_refuses_given_ones() -> None:
    assert load_config(None, ["task.split='leave_last'"]).task.valid_from is None
    with pytest.raises(ConfigError, match="task.valid_from needs task.split = 'global_time'"):
        load_config(None, ["task.split='leave_last'", "task.valid_from=5"])


@pytest.mark.parametrize(
    "path", sorted((REPO / "simulations").glob("*.toml")), ids=lambda p: p.name
)
def test_example_configs_are_valid(path: Path) -> None:
    load_config(path)


def test_file_and_overrides_combine(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[model]\nuser_rank = 4\n[lora]\nrank = 4\n", encoding="utf-8")
    config = load_config(path, ["lora.rank=16", "lora.target_modules=['query']", "data.path=x/y"])
    assert config.model.user_rank == 4
    assert config.lora.rank == 16 and config.lora.target_modules == ("query",)
    assert config.data.path == "x/y"


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("[model]\nscorr = 'x'\n", [], "model.scorr: unknown key"),
        ("[modle]\n", [], "modle: unknown key"),
        (
            "[model]\nscorer = 'bert'\n",
            [],
            "model.scorer: Input should be 'item_tower'",
        ),
        ("[lora]\nrank = 0\n", [], "lora.rank: Input should be greater than or equal to 1"),
        ("[task]\nhistory_len = 'five'\n", [], "task.history_len: Input should be a valid integer"),
        (
            "",
            ["train.batch_size=-1"],
            "train.batch_size: Input should be greater than or equal to 1",
        ),
        ("", ["train"], "expected section.key=value"),
        # privacy settings must be finite: ε = inf used to crash every training reply (issue 11)
        ("", ["dp.target_epsilon=inf"], "dp.target_epsilon: Input should be a finite number"),
        ("[dp]\ntarget_epsilon = nan\n", [], "dp.target_epsilon: Input should be a finite"),
        ("", ["dp.epsilon_budget=inf"], "dp.epsilon_budget: Input should be a finite number"),
        ("", ["dp.target_epsilon=0"], "dp.target_epsilon: Input should be greater than 0"),
        ("", ["dp.max_grad_norm=inf"], "dp.max_grad_norm: Input should be a finite number"),
        ("", ["dp.noise_multiplier=nan"], "dp.noise_multiplier: Input should be a finite"),
        ("", ["dp.delta=-1e-6"], "dp.delta: Input should be greater than 0"),
        ("[model\n", [], "invalid TOML"),
        ("", ["task.negatives_per_positive=0"], "needs task.negatives_per_positive >= 1"),
        ("", ["dp.unit='person'"], "dp.unit: Input should be 'example' or 'user'"),
        (
            "",
            ["dp.max_examples_per_user=0"],
            "dp.max_examples_per_user: Input should be greater than or equal to 1",
        ),
        # ghost clipping served the retired cross scorer only
        ("", ["dp.clipping='ghost'"], "dp.clipping = 'ghost' cannot run the item tower"),
        # a setting the configuration makes meaningless is refused, not ignored
        (
            "",
            ["federation.server_learning_rate=0.5"],
            "federation.server_learning_rate applies to schedule = 'rounds' only",
        ),
        ("", ["train.momentum=0.9"], "train.momentum needs train.optimizer = 'sgd'"),
    ],
)
def test_bad_configs_give_one_clear_line(
    tmp_path: Path, text: str, overrides: list[str], message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_privacy_unit_is_per_example_unless_chosen() -> None:
    assert load_config().dp.unit == "example" and load_config().dp.max_examples_per_user == 8
    chosen = load_config(None, ["dp.unit='user'", "dp.max_examples_per_user=4"]).dp
    assert (chosen.unit, chosen.max_examples_per_user, chosen.user_level) == ("user", 4, True)
    assert not load_config(None, ["dp.unit='user'", "dp.enabled=false"]).dp.user_level


def test_the_objective_is_softmax_unless_chosen() -> None:
    assert load_config(None).objective == "softmax"
    chosen = load_config(None, ["train.objective='bce'", "task.negatives_per_positive=0"])
    assert chosen.objective == "bce"


def test_cli_config_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--config", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedfuse: error: ") and "not found" in err[0]
    assert main(["config", "show", "--set", "model.user_rank=4"]) == 0
    assert '"user_rank": 4' in capsys.readouterr().out


def test_reference_lists_every_key() -> None:
    table = config_reference()
    for section, field in RunConfig.model_fields.items():
        for name in field.annotation.model_fields:
            assert f"`{section}.{name}`" in table


def test_the_documented_reference_is_current() -> None:
    """docs/configuration.md holds the generated table (regenerate it as that page says)."""
    assert config_reference() in (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")


def test_a_relative_config_file_is_found_in_the_app_from_any_directory(tmp_path, monkeypatch):
    from common.config import run_configuration

    monkeypatch.chdir(tmp_path)  # a SuperNode's working directory, far from the app
    config = run_configuration({"config-file": "simulations/synthetic_tiny.toml"})
    assert config.model.backbone == "data/tiny-bert" and config.federation.rounds == 3
