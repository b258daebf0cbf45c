"""AWQ (activation-aware scaling and clipping): scale math, exact folding, routing unchanged, pipeline run."""
from __future__ import annotations

import torch

from moequant import pipeline
from moequant.report import LayerRecord


def test_workdir_saves_and_yields_high_precision_tensors(tmp_path):
    """WorkDir.save_layer(tensors=...) round-trips any on-disk name -> tensor into Replacements.tensors."""
    work = pipeline.WorkDir(tmp_path / "w", {"v": 1}, resume=False)
    t = {"model.layers.0.post_attention_layernorm.weight": torch.randn(8, dtype=torch.bfloat16),
         "model.layers.0.mlp.gate.weight": torch.randn(4, 8)}
    work.save_layer(0, {}, LayerRecord(index=0, prefix="p", seconds=0.0, moe=False), [torch.zeros(1)], tensors=t)
    work.save_layer(1, {}, LayerRecord(index=1, prefix="p", seconds=0.0, moe=False), [torch.zeros(1)])
    chunks = list(work.iter_replacements(2))
    assert set(chunks[0].tensors) == set(t)
    for k, v in t.items():
        assert chunks[0].tensors[k].dtype == v.dtype and torch.equal(chunks[0].tensors[k], v)
    assert dict(chunks[1].tensors) == {} and dict(chunks[0].quantized) == {}
