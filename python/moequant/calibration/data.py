"""Calibration data: token windows from text files and whole samples from JSONL files.

Protocol (the one of ``shared/tools/ref_baseline.py``, with a local generator): the text files are read as
UTF-8, joined in order with ``"\\n\\n"`` and tokenized once (``tokenizer(text)["input_ids"]``, the tokenizer's
default special tokens); window starts are ``torch.randint(0, n_tokens - seq_len, (n,), generator=g)`` with
``g = torch.Generator().manual_seed(seed)`` and each window is ``ids[start : start + seq_len]``. With one text
file, ``seed=0``, ``num_samples=128`` and ``seq_len=512`` this draws exactly the reference's windows. The global
RNG is never touched.

JSONL files hold one sample per line, ``{"input_ids": [...]}`` or ``{"text": "..."}``; samples shorter than
``seq_len`` tokens are dropped (the count is logged and reported), longer ones truncated to ``seq_len``. They
come first: up to ``num_samples`` of them (a seeded random subset, in file order, when there are more), and
text windows fill the remaining ``num_samples - n_jsonl`` rows.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ..recipe.recipe import CalibrationConfig

__all__ = ["CalibrationSet", "load_calibration", "calibration_batches", "calibration_ids", "iter_batches",
           "tokenize_text_files", "read_jsonl_samples", "load_tokenizer", "read_utf8", "TOKENIZER_FILES"]

logger = logging.getLogger(__name__)


@dataclass
class CalibrationSet:
    """Calibration samples and where they came from.

    Attributes:
        input_ids: int64 ``[n, seq_len]`` (``n == num_samples`` unless the JSONL files alone were too few).
        text_tokens: tokens of the concatenated text files (0 when none were read).
        num_windows: rows drawn from the text; num_jsonl: rows taken from JSONL files (they come first).
        jsonl_dropped: JSONL samples dropped for having fewer than ``seq_len`` tokens.
        window_starts: int64 ``[num_windows]`` start offsets of the text windows.
    """

    input_ids: torch.Tensor
    text_tokens: int = 0
    num_windows: int = 0
    num_jsonl: int = 0
    jsonl_dropped: int = 0
    window_starts: torch.Tensor | None = None

    def summary(self) -> str:
        n, s = self.input_ids.shape
        out = f"{n} calibration samples x {s} tokens ({self.num_windows} text windows from {self.text_tokens} " \
              f"tokens, {self.num_jsonl} JSONL samples"
        return out + (f", {self.jsonl_dropped} JSONL samples dropped as shorter than {s} tokens)"
                      if self.jsonl_dropped else ")")


# Files from which transformers builds a tokenizer (one of them must be present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "*.tiktoken", "spiece.model",
                   "sentencepiece.bpe.model")


def load_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer saved in a model directory (``AutoTokenizer.from_pretrained``), checked to tokenize text.

    Raises FileNotFoundError when the directory holds none of :data:`TOKENIZER_FILES`, and ValueError when
    transformers cannot build the tokenizer or it turns text into no tokens; both name the directory, the
    expected files and the remedy (copy the model's tokenizer files there)."""
    d = Path(model_dir)
    remedy = (f"copy the model's tokenizer files into {d} (tokenizer.save_pretrained('{d}')), or give the "
              "calibration as token ids (a tensor, or JSONL lines of input_ids)")
    if not any(any(d.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise FileNotFoundError(f"{d}: no tokenizer files (expected tokenizer.json, or one of "
                                f"{', '.join(TOKENIZER_FILES[1:])}); text needs the model's tokenizer: {remedy}")
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(os.fspath(d))
        ok = len(tok) > 1 and len(tok("Hello world")["input_ids"]) > 0
    except Exception as exc:  # transformers raises ValueError/OSError/TypeError/... depending on what is missing
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{d}: the tokenizer cannot be loaded ({first}); {remedy}") from None
    if not ok:
        raise ValueError(f"{d}: the tokenizer loaded from it turns text into no tokens (vocabulary of {len(tok)}); "
                         f"its files are incomplete: {remedy}")
    return tok


class _DeferredTokenizer:
    """The tokenizer of a model directory, loaded (by :func:`load_tokenizer`) at the first text it tokenizes:
    calibration given as token ids never needs one."""

    def __init__(self, path: str | os.PathLike):
        self.path, self._tok = path, None

    def __call__(self, text: str):
        if self._tok is None:
            self._tok = load_tokenizer(self.path)
        return self._tok(text)


def _tokenizer(tokenizer_or_path: Any):
    if isinstance(tokenizer_or_path, (str, os.PathLike)):
        return load_tokenizer(tokenizer_or_path)
    return tokenizer_or_path


def read_utf8(path: str | os.PathLike, what: str = "text file") -> str:
    """The text of a UTF-8 file; a file that is not UTF-8 raises ValueError naming it and the first bad byte
    offset (``not UTF-8 at byte N``), with the remedy."""
    p = Path(path)
    data = p.read_bytes()
    try:  # newlines translated like open(p).read() / Path.read_text() (universal newlines)
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        raise ValueError(_not_utf8(p, what, exc.start, exc)) from None


def _not_utf8(p: Path, what: str, offset: int, exc: UnicodeDecodeError) -> str:
    bad = exc.object[exc.start:exc.start + 4]
    return (f"{what} {p}: not UTF-8 at byte {offset} ({exc.reason}: {bad!r}); convert it to UTF-8, e.g. "
            f"iconv -f latin1 -t utf-8 {p} > {p.with_name(p.stem + '.utf8' + p.suffix)}")


def _existing(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} not found; pass an existing file (calibration.{what.split()[0]}_files "
                                f"in the recipe or --calib)")
    return p


def tokenize_text_files(tokenizer: Any, paths: list[str]) -> torch.Tensor:
    """The text files joined in order with ``"\\n\\n"`` and tokenized once: int64 ``[n_tokens]``."""
    texts = []
    for path in paths:
        p = _existing(path, "text file")
        text = read_utf8(p, "calibration text")
        if not text.strip():
            raise ValueError(f"calibration text {p} is empty; pass a file with text or remove it from text_files")
        texts.append(text)
    return torch.tensor(_tokenizer(tokenizer)("\n\n".join(texts))["input_ids"], dtype=torch.long)


def _check_ids(ids: Any, where: str, vocab: int | None) -> list[int]:
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ValueError(f"{where}: 'input_ids' must be a list of non-negative integers")
    if vocab is not None and ids and max(ids) >= vocab:
        raise ValueError(f"{where}: token id {max(ids)} is outside the tokenizer's vocabulary of {vocab}; "
                         "were these ids made with another tokenizer?")
    return ids


def read_jsonl_samples(tokenizer: Any, path: str | os.PathLike, seq_len: int) -> tuple[list[torch.Tensor], int]:
    """Samples of one JSONL file truncated to ``seq_len``: ``(kept [seq_len] tensors, dropped count)``.

    Each non-blank line is ``{"input_ids": [...]}`` or ``{"text": "..."}``; samples shorter than ``seq_len``
    tokens are dropped.
    """
    p = _existing(path, "jsonl file")
    tok = None
    vocab = None
    kept: list[torch.Tensor] = []
    dropped = 0
    offset = 0
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(_not_utf8(p, "calibration JSONL", offset + exc.start, exc)) from None
            offset += len(raw)
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc}); each line must be one JSON object") from None
            if isinstance(rec, dict) and "input_ids" in rec:
                if vocab is None and hasattr(tokenizer, "__len__") and not isinstance(tokenizer, (str, os.PathLike)):
                    vocab = len(tokenizer)
                ids = _check_ids(rec["input_ids"], where, vocab)
            elif isinstance(rec, dict) and isinstance(rec.get("text"), str):
                tok = tok or _tokenizer(tokenizer)
                ids = list(tok(rec["text"])["input_ids"])
            else:
                raise ValueError(f"{where}: expected an object with 'input_ids' (list of ints) or 'text' (string)")
            if len(ids) < seq_len:
                dropped += 1
            else:
                kept.append(torch.tensor(ids[:seq_len], dtype=torch.long))
    return kept, dropped


def load_calibration(tokenizer: Any, cfg: CalibrationConfig) -> CalibrationSet:
    """Builds the calibration samples of ``cfg`` (see the module docstring).

    Args:
        tokenizer: a Hugging Face tokenizer (``tokenizer(text)["input_ids"]``), or a model directory whose
            tokenizer is loaded (:func:`load_tokenizer`) only when some text needs it.
        cfg: the :class:`~moequant.recipe.CalibrationConfig`.
    Raises:
        FileNotFoundError: a listed file does not exist. ValueError: no files, empty text, fewer than
        ``seq_len + 1`` text tokens, malformed JSONL, or no sample at all.
    """
    if not isinstance(cfg, CalibrationConfig):
        raise ValueError(f"cfg: expected a CalibrationConfig, got {type(cfg).__name__}")
    cfg.validate()
    if isinstance(tokenizer, (str, os.PathLike)):  # loaded once, and only if some text needs it
        tokenizer = _DeferredTokenizer(tokenizer)
    n, seq_len = cfg.num_samples, cfg.seq_len
    if not cfg.text_files and not cfg.jsonl_files:
        raise ValueError("calibration: no text_files or jsonl_files given; pass --calib FILE (or set "
                         "calibration.text_files in the recipe), or use method 'rtn' which needs no data")
    rows: list[torch.Tensor] = []
    dropped = total = 0
    for path in cfg.jsonl_files:
        kept, d = read_jsonl_samples(tokenizer, path, seq_len)
        rows += kept
        dropped += d
        total += len(kept) + d
    if dropped:
        logger.warning("calibration: dropped %d of %d JSONL samples shorter than seq_len=%d tokens",
                       dropped, total, seq_len)
    if cfg.jsonl_files and not rows and not cfg.text_files:
        raise ValueError(f"calibration: none of the {total} JSONL samples has seq_len={seq_len} tokens; "
                         "use a smaller seq_len or longer samples")
    if len(rows) > n:
        g = torch.Generator().manual_seed(cfg.seed)
        pick = torch.randperm(len(rows), generator=g)[:n].sort().values
        rows = [rows[i] for i in pick.tolist()]
    need = n - len(rows)
    out = CalibrationSet(input_ids=torch.empty(0, seq_len, dtype=torch.long), num_jsonl=len(rows),
                         jsonl_dropped=dropped)
    if need and cfg.text_files:
        ids = tokenize_text_files(tokenizer, cfg.text_files)
        out.text_tokens = int(ids.numel())
        if ids.numel() < seq_len + 1:
            raise ValueError(f"calibration text ({', '.join(cfg.text_files)}) yields {ids.numel()} tokens, fewer "
                             f"than seq_len + 1 = {seq_len + 1}; use more text or a smaller seq_len")
        g = torch.Generator().manual_seed(cfg.seed)
        starts = torch.randint(0, ids.numel() - seq_len, (need,), generator=g)
        rows.append(ids[starts[:, None] + torch.arange(seq_len)])
        out.num_windows, out.window_starts = need, starts
    elif need:
        logger.warning("calibration: only %d samples of %d tokens available (num_samples=%d); add text_files or "
                       "lower num_samples", len(rows), seq_len, n)
    elif cfg.text_files:
        logger.info("calibration: JSONL files gave all %d samples; text_files unused", n)
    out.input_ids = torch.cat([r.reshape(-1, seq_len) for r in rows]) if rows else out.input_ids
    logger.info("calibration: %s", out.summary())
    return out


def calibration_batches(tokenizer: Any, cfg: CalibrationConfig) -> torch.Tensor:
    """The calibration samples of ``cfg``: int64 ``[num_samples, seq_len]`` (see :func:`load_calibration`)."""
    return load_calibration(tokenizer, cfg).input_ids


def iter_batches(input_ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive slices of ``batch_size`` rows of ``input_ids`` ``[n, seq_len]`` (the last may be smaller)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    for i in range(0, input_ids.shape[0], batch_size):
        yield input_ids[i:i + batch_size]


def calibration_ids(calibration, model_dir: Path, cfg: CalibrationConfig, vocab_size: Optional[int] = None
                    ) -> torch.Tensor:
    """The calibration token ids ``[num_samples, seq_len]`` of a run, checked against the model's vocabulary.

    ``calibration``: token ids (an int64/int32 tensor), a text or JSONL file path or a list of them (read with
    ``cfg``'s sample count, length and seed), or None for ``cfg``'s files. Text is tokenized with the tokenizer
    saved in ``model_dir``, which is loaded only when some text needs it (token ids, as a tensor or JSONL
    ``input_ids``, need no tokenizer)."""
    if calibration is None:
        if not cfg.text_files and not cfg.jsonl_files:
            raise ValueError("calibration: no calibration data; pass a text file (CLI: --calib FILE) or set "
                             "calibration.text_files in the recipe")
        ids = calibration_batches(model_dir, cfg)
    elif isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"calibration: expected token ids [num_samples, seq_len] (int64), got "
                             f"{calibration.dtype} {tuple(calibration.shape)}")
        if calibration.numel() == 0:
            raise ValueError(f"calibration: expected token ids [num_samples, seq_len] with at least one sample of "
                             f"at least one token, got the empty shape {tuple(calibration.shape)}")
        ids = calibration.detach().cpu().long()
    elif isinstance(calibration, (str, os.PathLike, list, tuple)):
        files = [calibration] if isinstance(calibration, (str, os.PathLike)) else list(calibration)
        if not files or not all(isinstance(f, (str, os.PathLike)) for f in files):
            raise ValueError(f"calibration: expected a file path or a non-empty list of file paths, got "
                             f"{calibration!r}")
        files = [os.fspath(f) for f in files]
        cfg = dataclasses.replace(cfg, text_files=[f for f in files if not f.endswith(".jsonl")],
                                  jsonl_files=[f for f in files if f.endswith(".jsonl")])
        ids = calibration_batches(model_dir, cfg)
    else:
        raise ValueError(f"calibration: expected token ids [num_samples, seq_len] (an int64 tensor), a text or "
                         f"JSONL file path (or a list of them), or None for the recipe's files; got "
                         f"{type(calibration).__name__}")
    if ids.numel() == 0:
        raise ValueError("calibration: the calibration data gave no sample; add text or JSONL samples of at least "
                         f"seq_len={cfg.seq_len} tokens")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        bad = lo if lo < 0 else hi
        row = int((ids == bad).any(dim=1).nonzero()[0, 0])
        limit = f"[0, vocab_size={vocab_size}) of {model_dir / 'config.json'}" if vocab_size else "[0, vocab_size)"
        raise ValueError(f"calibration: token ids must lie in {limit}, got {'min' if lo < 0 else 'max'} id {bad} "
                         f"(sample {row}); "
                         f"tokenize with this model's tokenizer (ids from another tokenizer do not fit its "
                         f"embedding)")
    return ids
