"""Calibration data: the reference window protocol, JSONL samples, error messages, RNG hygiene."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from moequant.calibration.data import CalibrationSet, calibration_batches, iter_batches, load_calibration
from moequant.recipe import CalibrationConfig

TINY = Path(__file__).resolve().parents[2] / ".." / "shared" / "models" / "qwen3moe-tiny"
EVALTEXT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "evaltext"


class CharTokenizer:
    """One token per character (code point mod 256): fast and exactly predictable."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": [ord(c) % 256 for c in text]}

    def __len__(self) -> int:
        return 256


def _text(n: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return "".join(chr(97 + int(i)) for i in torch.randint(0, 26, (n,), generator=g))


@pytest.fixture
def text_file(tmp_path) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text(_text(5000))
    return p


def _ids(text: str) -> torch.Tensor:
    return torch.tensor(CharTokenizer()(text)["input_ids"], dtype=torch.long)


def test_reference_protocol(text_file):
    cfg = CalibrationConfig(text_files=[str(text_file)], num_samples=16, seq_len=64, seed=0)
    got = calibration_batches(CharTokenizer(), cfg)
    assert got.shape == (16, 64) and got.dtype == torch.long
    cal = _ids(text_file.read_text())
    with torch.random.fork_rng(devices=[]):  # the reference uses the global seed
        torch.manual_seed(0)
        ix = torch.randint(0, len(cal) - 64, (16,))
    assert torch.equal(got, torch.stack([cal[i:i + 64] for i in ix]))


def test_global_rng_untouched_and_seed_matters(text_file):
    state = torch.get_rng_state()
    cfg = CalibrationConfig(text_files=[str(text_file)], num_samples=8, seq_len=32, seed=5)
    a = calibration_batches(CharTokenizer(), cfg)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, calibration_batches(CharTokenizer(), cfg))
    cfg.seed = 6
    assert not torch.equal(a, calibration_batches(CharTokenizer(), cfg))


def test_text_files_concatenated_in_order(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(_text(300, 1))
    b.write_text(_text(300, 2))
    cfg = CalibrationConfig(text_files=[str(a), str(b)], num_samples=32, seq_len=50)
    cs = load_calibration(CharTokenizer(), cfg)
    joined = _ids(a.read_text() + "\n\n" + b.read_text())
    assert cs.text_tokens == 602 and cs.num_windows == 32 and cs.num_jsonl == 0
    assert cs.window_starts.max() < 602 - 50
    for row, s in zip(cs.input_ids, cs.window_starts.tolist()):
        assert torch.equal(row, joined[s:s + 50])


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return path


def test_jsonl_samples_first_then_windows(tmp_path, text_file, caplog):
    j = _jsonl(tmp_path / "s.jsonl", [{"input_ids": list(range(40))}, {"text": "x" * 10},
                                      {"text": "y" * 20}, {"input_ids": [1] * 5}])
    cfg = CalibrationConfig(text_files=[str(text_file)], jsonl_files=[str(j)], num_samples=5, seq_len=20)
    with caplog.at_level(logging.WARNING, logger="moequant.calibration.data"):
        cs = load_calibration(CharTokenizer(), cfg)
    assert "dropped 2 of 4 JSONL samples" in caplog.text
    assert (cs.num_jsonl, cs.jsonl_dropped, cs.num_windows) == (2, 2, 3)
    assert cs.input_ids.shape == (5, 20)
    assert cs.input_ids[0].tolist() == list(range(20))  # truncated to seq_len
    assert cs.input_ids[1].tolist() == [ord("y")] * 20
    assert "2 JSONL samples dropped" in cs.summary()


def test_jsonl_more_than_num_samples_is_seeded_subset(tmp_path):
    j = _jsonl(tmp_path / "s.jsonl", [{"input_ids": [i] * 8} for i in range(20)])
    cfg = CalibrationConfig(jsonl_files=[str(j)], num_samples=6, seq_len=8, seed=1)
    a = calibration_batches(CharTokenizer(), cfg)
    firsts = a[:, 0].tolist()
    assert a.shape == (6, 8) and firsts == sorted(firsts) and len(set(firsts)) == 6  # file order, no repeats
    assert torch.equal(a, calibration_batches(CharTokenizer(), cfg))


def test_jsonl_only_too_few_warns(tmp_path, caplog):
    j = _jsonl(tmp_path / "s.jsonl", [{"input_ids": [3] * 8}] * 3)
    cfg = CalibrationConfig(jsonl_files=[str(j)], num_samples=10, seq_len=8)
    with caplog.at_level(logging.WARNING, logger="moequant.calibration.data"):
        ids = calibration_batches(CharTokenizer(), cfg)
    assert ids.shape == (3, 8) and "only 3 samples" in caplog.text


@pytest.mark.parametrize("line, match", [
    ("{not json", r"s.jsonl:1: not valid JSON"),
    ('{"foo": 1}', r"s.jsonl:1: expected an object with 'input_ids'"),
    ('{"input_ids": [1, "a"]}', r"'input_ids' must be a list of non-negative integers"),
    ('{"input_ids": [1, 999]}', r"token id 999 is outside the tokenizer's vocabulary of 256"),
])
def test_jsonl_errors(tmp_path, line, match):
    j = tmp_path / "s.jsonl"
    j.write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        calibration_batches(CharTokenizer(), CalibrationConfig(jsonl_files=[str(j)], seq_len=2))


def test_jsonl_all_dropped_is_an_error(tmp_path):
    j = _jsonl(tmp_path / "s.jsonl", [{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="none of the 1 JSONL samples has seq_len=8 tokens; use a smaller seq_len"):
        calibration_batches(CharTokenizer(), CalibrationConfig(jsonl_files=[str(j)], seq_len=8))


def test_errors_with_remedies(tmp_path, text_file):
    tok = CharTokenizer()
    with pytest.raises(FileNotFoundError, match="missing.txt not found; pass an existing file"):
        calibration_batches(tok, CalibrationConfig(text_files=[str(tmp_path / "missing.txt")]))
    with pytest.raises(FileNotFoundError, match="calibration.jsonl_files"):
        calibration_batches(tok, CalibrationConfig(jsonl_files=[str(tmp_path / "missing.jsonl")]))
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        calibration_batches(tok, CalibrationConfig(text_files=[str(empty)]))
    short = tmp_path / "short.txt"
    short.write_text("abcdefgh")  # 8 tokens
    with pytest.raises(ValueError, match=r"yields 8 tokens, fewer than seq_len \+ 1 = 9.*smaller seq_len"):
        calibration_batches(tok, CalibrationConfig(text_files=[str(short)], seq_len=8))
    assert calibration_batches(tok, CalibrationConfig(text_files=[str(short)], seq_len=7, num_samples=3)).shape \
        == (3, 7)  # 8 tokens are enough for windows of 7 (the only start is 0)
    with pytest.raises(ValueError, match="no text_files or jsonl_files given; pass --calib"):
        calibration_batches(tok, CalibrationConfig())
    cfg = CalibrationConfig(text_files=[str(text_file)])
    cfg.num_samples = 0  # mutated after construction: re-validated
    with pytest.raises(ValueError, match="calibration.num_samples: expected an integer >= 1, got 0"):
        calibration_batches(tok, cfg)
    with pytest.raises(ValueError, match="cfg: expected a CalibrationConfig"):
        calibration_batches(tok, {"text_files": [str(text_file)]})


def test_iter_batches():
    ids = torch.arange(10 * 4).reshape(10, 4)
    parts = list(iter_batches(ids, 4))
    assert [p.shape[0] for p in parts] == [4, 4, 2] and torch.equal(torch.cat(parts), ids)
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_batches(ids, 0))


def test_calibration_set_summary():
    cs = CalibrationSet(input_ids=torch.zeros(3, 5, dtype=torch.long), text_tokens=100, num_windows=3)
    assert cs.summary() == "3 calibration samples x 5 tokens (3 text windows from 100 tokens, 0 JSONL samples)"


def test_real_tokenizer_matches_reference_baseline(tmp_path):
    """Same windows as shared/tools/ref_baseline.py (global seed 0) on a slice of calib.txt, via a model path."""
    if not (TINY / "tokenizer.json").is_file() or not (EVALTEXT / "calib.txt").is_file():
        pytest.skip(f"shared model/data not found under {TINY.parent.parent}")
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(TINY))
    text = (EVALTEXT / "calib.txt").read_text(encoding="utf-8")[:60000]
    path = tmp_path / "calib.txt"
    path.write_text(text, encoding="utf-8")
    got = calibration_batches(str(TINY), CalibrationConfig(text_files=[str(path)], num_samples=128, seq_len=512))
    cal = torch.tensor(tok(open(path).read())["input_ids"], dtype=torch.long)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ix = torch.randint(0, len(cal) - 512, (128,))
    assert torch.equal(got, torch.stack([cal[i:i + 512] for i in ix]))
