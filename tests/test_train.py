"""The toy's training loop (freeloc_dist/testbed/train.py) runs (transformer and decoder steps) and writes a
checkpoint the production loader reads, with the requested architecture, and a log with finite losses.
Whether training converges is what bench/quality.py measures, not this test."""

import math

import pytest
import torch

from freeloc_dist.families.wan.toy_train import TrainConfig, train
from freeloc_dist.models import load_components

pytestmark = pytest.mark.unit


def test_train_smoke_writes_a_loadable_checkpoint(tmp_path):
    out = train(TrainConfig(out_dir=tmp_path / "toy", batch=2, max_steps=2, trained_frames=3, decoder_every=2,
                            decoder_batch=1, save_minutes=1e9,
                            transformer_overrides={"num_attention_heads": 2, "attention_head_dim": 48}),
                log=lambda line: None)
    parts = load_components(out, "float32", "cpu")
    assert parts.transformer.config.num_attention_heads == 2 and parts.transformer.config.attention_head_dim == 48
    assert parts.transformer.rope.t_dim == 16  # 48 - 4 * (48 // 6): eight temporal frequencies
    lines = (tmp_path / "toy.log").read_text().splitlines()
    assert lines[0].startswith("step 1 ") and lines[-1].startswith("done: 2 steps")
    loss = float(lines[0].split(" loss ")[1].split()[0])
    assert math.isfinite(loss) and loss > 0
    assert all(torch.isfinite(p).all() for p in parts.transformer.parameters())
