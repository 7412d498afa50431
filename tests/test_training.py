"""Local training without DP really moves the adapters (and only them) and lowers the loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from client.dp_training import LocalTrainer
from common.adapters import trainable_arrays
from common.backbone import load_backbone
from common.config import DPConfig, LoraSettings, ModelConfig, TaskConfig, TrainConfig
from common.evaluation import evaluate
from common.featurizer import TextFeaturizer
from common.model import build_scorer
from common.platform_data import read_dataset
from common.task import build_task
from common.training import loss_on

TINY_TASK = TaskConfig(split="leave_last", history_len=5)


def test_training_changes_adapters_only_and_lowers_loss(
    tiny_bert_dir: Path, synthetic_dir: Path
) -> None:
    torch.manual_seed(0)
    data = read_dataset(synthetic_dir)[0]
    task = build_task(data, TINY_TASK)
    backbone, tokenizer = load_backbone(str(tiny_bert_dir))
    scorer = build_scorer(backbone, ModelConfig(), LoraSettings(rank=4))
    featurizer = TextFeaturizer(tokenizer, data.item_text, max_length=48)
    frozen = {n: p.detach().clone() for n, p in scorer.named_parameters() if not p.requires_grad}
    before = trainable_arrays(scorer)
    probe = task.train[:64]
    with torch.no_grad():
        loss_before = float(loss_on(scorer.eval(), featurizer, probe))

    plain = DPConfig(enabled=False, expected_batch_size=16)
    train = TrainConfig(batch_size=8, adapter_every=1)
    trainer = LocalTrainer(scorer, featurizer, probe, train, plain)
    result = trainer.run(steps=40, learning_rate=5e-3, noise_multiplier=None)

    assert result.steps == 40 and result.mechanism is None
    with torch.no_grad():
        loss_after = float(loss_on(scorer.eval(), featurizer, probe))
    assert loss_after < 0.8 * loss_before
    after = trainable_arrays(scorer)
    changed = [n for n in before if not np.array_equal(before[n], after[n])]
    assert any("lora_B" in n for n in changed) and any(n.startswith("head.") for n in changed)
    for name, value in scorer.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name


def test_evaluation_reports_protocol_metrics(tiny_bert_dir: Path, synthetic_dir: Path) -> None:
    data = read_dataset(synthetic_dir)[0]
    task = build_task(data, TINY_TASK)
    backbone, tokenizer = load_backbone(str(tiny_bert_dir))
    scorer = build_scorer(backbone, ModelConfig(), LoraSettings(rank=4))
    featurizer = TextFeaturizer(tokenizer, data.item_text, max_length=48)
    full = evaluate(scorer, featurizer, task, "test")
    ranking = {"hr@10", "ndcg@10", "mrr", "full-ndcg@10", "full-recall@20"}
    assert set(full) == ranking | {"auc", "logloss", "ranking_cases", "examples"}
    assert full["ranking_cases"] == len(task.test_ranking) and full["examples"] == len(task.test)
    assert 0 <= full["ndcg@10"] <= full["hr@10"] <= 1
    assert 0 <= full["full-ndcg@10"] <= full["ndcg@10"]  # more rivals: never a better rank
    sampled = evaluate(scorer, featurizer, task, "test", max_cases=3)
    assert "full-ndcg@10" not in sampled  # the whole catalogue only when every case is scored
    assert sampled["ranking_cases"] == 3 and sampled["examples"] < full["examples"]
    assert scorer.training  # evaluate restores the mode it found
