"""lm-evaluation-harness as users run it (``lm_eval --model hf --model_args pretrained=OUT ...``) loads a moequant
checkpoint and scores it on a small local task (no network). Skipped where lm_eval is not installed (it is not a
moequant dependency: ``pip install "lm-eval[hf]"``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moequant import pipeline
from moequant.recipe import CalibrationConfig, QuantScheme, Recipe
from testdata import tiny_qwen3_checkpoint

REPO = Path(__file__).resolve().parents[2]
CALIB = REPO / "examples" / "data" / "wikitext2_calib.txt"

TASK = """task: moequant_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

DOCS = [("The capital of France is", [" Paris", " a banana"], 0),
        ("Water freezes at zero degrees", [" Celsius", " purple"], 0),
        ("One, two, three,", [" four", " seven hundred"], 0),
        ("The opposite of hot is", [" loud", " cold"], 1)]


def test_lm_eval_loads_and_scores_a_moequant_checkpoint(tmp_path):
    for module in ("lm_eval", "accelerate"):  # accelerate: lm_eval's hf backend ("lm-eval[hf]")
        pytest.importorskip(module, reason=f"lm-evaluation-harness with its hf backend is not installed ({module} "
                            f"missing): pip install 'lm-eval[hf]'")
    model = tiny_qwen3_checkpoint(tmp_path / "model")
    out = tmp_path / "w4"
    recipe = Recipe(scheme=QuantScheme(group_size=32, symmetric=True),  # transformers reads symmetric schemes
                    calibration=CalibrationConfig(text_files=[str(CALIB)], num_samples=4, seq_len=64))
    pipeline.quantize(model, recipe, output_dir=out, progress=False)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "docs.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in DOCS))
    (tasks / "moequant_tiny_choice.yaml").write_text(TASK.format(data=data))
    results = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={out},dtype=float32",
           "--tasks", "moequant_tiny_choice", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "4",
           "--output_path", str(results)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    files = list(results.rglob("results*.json"))
    assert files, r.stdout[-2000:]
    res = json.loads(files[0].read_text())["results"]["moequant_tiny_choice"]
    assert 0.0 <= res["acc,none"] <= 1.0
    assert "moequant_tiny_choice" in r.stdout  # the table users read
