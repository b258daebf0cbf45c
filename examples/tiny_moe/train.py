#!/usr/bin/env python3
"""Trains the tiny Qwen3-MoE that ships with moequant (examples/tiny_moe/model/) from scratch.

Text: examples/data/wikitext2_train.txt (WikiText-2 validation split, CC BY-SA 3.0). The last
``--val-frac`` of its tokens is kept out of training and used only to pick the best checkpoint;
examples/data/wikitext2_heldout.txt (a slice of WikiText-2 test) is never looked at until the final
report. Tokenizer: the byte-level BPE (vocab 8192) in examples/tiny_moe/tokenizer/.

Usage (from the repository root):
    python examples/tiny_moe/train.py --out DIR [--steps N] [--minutes M] [--device cuda|cpu]

By default the run is a fixed schedule of --steps 800 optimizer steps of 64 x 256 tokens (~40 epochs of
the 324k training tokens, under a minute on one H100), seeded and reproducible up to GPU kernel
nondeterminism. Longer schedules overfit this little text (held-out perplexity gets worse, see
README.md), so --minutes (default 3.5) is only a cap: if it is reached first, training stops there.
--steps 0 instead sizes the cosine schedule to fill --minutes (the step time is measured over the first
steps). The best validation checkpoint is kept (the last one, for the default schedule). The script needs no network
and writes only into --out, which must be empty or absent; it ends up holding exactly

    config.json  generation_config.json  model.safetensors  tokenizer.json  tokenizer_config.json
    train_result.json

Perplexity protocol (same as moequant.evaluation): the whole file is tokenized once, non-overlapping
windows of seq_len tokens start at 0, seq_len, ... while start < n_tokens - seq_len; each window
contributes the cross-entropy of its seq_len - 1 next-token predictions from fp32 logits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DATA = REPO / "examples" / "data"
TOKENIZER_DIR = HERE / "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
OUTPUT_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "train_result.json",
}


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps (0: size the schedule to fill --minutes)")
    p.add_argument("--minutes", type=float, default=3.5, help="training time cap (and the budget with --steps 0)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="windows per step")
    p.add_argument("--seq-len", type=int, default=256, help="training window length")
    p.add_argument("--eval-seq-len", type=int, default=256, help="perplexity window length")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.05, help="final lr as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=100, help="warmup steps (capped at 10%% of the run)")
    p.add_argument("--weight-decay", type=float, default=1.0)
    p.add_argument("--attention-dropout", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.2,
                   help="training-only dropout on the embeddings and on each attention / MoE block output "
                        "(forward hooks; not part of the saved model)")
    p.add_argument("--val-frac", type=float, default=0.05, help="tail of the training text kept for model selection")
    p.add_argument("--eval-every", type=int, default=100, help="validation every N steps (0: only at the end)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--experts-impl", default=None, help="transformers experts implementation (eager, grouped_mm, ...)")
    return p.parse_args()


def build_config(vocab_size: int, attention_dropout: float) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,  # dense-MLP size; unused (every layer is MoE: mlp_only_layers=[], decoder_sparse_step=1)
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        hidden_act="silu",
        max_position_embeddings=512,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=False,
        attention_dropout=attention_dropout,
        decoder_sparse_step=1,
        moe_intermediate_size=128,
        num_experts_per_tok=2,
        num_experts=8,
        norm_topk_prob=True,
        output_router_logits=False,  # turned on per forward while training
        router_aux_loss_coef=0.01,
        mlp_only_layers=[],
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def read_ids(tokenizer, path: Path) -> torch.Tensor:
    return torch.tensor(tokenizer(path.read_text(encoding="utf-8"))["input_ids"], dtype=torch.long)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int, device: torch.device, batch_size: int = 32,
               autocast: bool = False) -> float:
    """Non-overlapping-window perplexity (the moequant.evaluation protocol)."""
    was_training = model.training
    model.eval()
    starts = list(range(0, ids.numel() - seq_len, seq_len))
    if not starts:
        raise ValueError(f"{ids.numel()} tokens: fewer than seq_len + 1 = {seq_len + 1}")
    nll, count = 0.0, 0
    for b in range(0, len(starts), batch_size):
        batch = torch.stack([ids[i : i + seq_len] for i in starts[b : b + batch_size]]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=batch).logits
        nll += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                     batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch.shape[0] * (seq_len - 1)
    model.train(was_training)
    return math.exp(nll / count)


def lr_at(step: int, total: int, warmup: int, base: float, min_frac: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_frac + (1.0 - min_frac) * 0.5 * (1.0 + math.cos(math.pi * t)))


def main() -> int:
    args = parse_args()
    t_start = time.monotonic()
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        log(f"error: --out {out} exists and is not an empty directory")
        return 2

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(args.seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, device {dev_name}")

    # ---- data --------------------------------------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)
    vocab_size = len(tokenizer)
    train_all = read_ids(tokenizer, DATA / "wikitext2_train.txt")
    heldout = read_ids(tokenizer, DATA / "wikitext2_heldout.txt")
    n_val = int(train_all.numel() * args.val_frac)
    train_ids, val_ids = (train_all[:-n_val], train_all[-n_val:]) if n_val > args.eval_seq_len else (train_all, None)
    log(f"tokens: train {train_ids.numel()}, val {0 if val_ids is None else val_ids.numel()}, heldout {heldout.numel()} "
        f"(vocab {vocab_size})")
    train_gpu = train_ids.to(device)
    n_starts = train_ids.numel() - args.seq_len
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)

    # ---- model -------------------------------------------------------------------------------------
    config = build_config(vocab_size, args.attention_dropout)
    kw = {"experts_implementation": args.experts_impl} if args.experts_impl else {}
    model = Qwen3MoeForCausalLM._from_config(config, dtype=torch.float32, **kw).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if args.dropout > 0:
        def _drop(module, inputs, output):
            return F.dropout(output, args.dropout, training=module.training)
        model.model.embed_tokens.register_forward_hook(_drop)
        for layer in model.model.layers:
            layer.self_attn.o_proj.register_forward_hook(_drop)
            layer.mlp.register_forward_hook(_drop)
    log(f"model: {n_params} parameters ({n_params * 2 / 2**20:.2f} MiB in bf16), experts implementation "
        f"{model.config._experts_implementation}, attention {model.config._attn_implementation}")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "gate.weight" not in n and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "gate.weight" not in n and "norm" not in n)]
    opt_kw = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **opt_kw,
    )

    def batch_at() -> torch.Tensor:
        starts = torch.randint(0, n_starts, (args.batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(args.seq_len)[None, :]
        return train_gpu[idx.to(device)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # ---- training ----------------------------------------------------------------------------------
    budget_s = args.minutes * 60.0
    total = args.steps if args.steps > 0 else None  # with --steps 0: fixed once the step time is known
    warmup = args.warmup if total is None else max(1, min(args.warmup, total // 10))
    measure_from, measure_to = 5, 25
    best = {"val_ppl": float("inf"), "step": 0, "state": None}
    history = []
    model.train()
    sync()
    t_train = time.monotonic()
    t_measure = None
    step, loss_val, tokens = 0, float("nan"), 0
    while True:
        if total is not None and step >= total:
            break
        if step > 0 and time.monotonic() - t_train > budget_s:
            log(f"time budget of {args.minutes:g} min reached at step {step}" + ("" if total is None or step >= total
                else f" (of {total}: the schedule was cut short)"))
            break
        lr = lr_at(step, total if total is not None else 10**9, warmup, args.lr, args.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch_at()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            outp = model(input_ids=x, labels=x, output_router_logits=True, use_cache=False)
        outp.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += x.numel()

        if total is None and step == measure_from:
            sync()
            t_measure = time.monotonic()
        if total is None and step == measure_to:
            sync()
            dt = (time.monotonic() - t_measure) / (measure_to - measure_from)
            per_eval = 0.0
            if val_ids is not None and args.eval_every > 0:
                t0 = time.monotonic()
                perplexity(model, val_ids, args.eval_seq_len, device, autocast=True)
                sync()
                per_eval = time.monotonic() - t0
            remaining = budget_s - (time.monotonic() - t_train)
            eff = dt + (per_eval / args.eval_every if args.eval_every > 0 else 0.0)
            total = max(measure_to + 1, step + int(0.97 * remaining / eff))
            warmup = max(1, min(args.warmup, total // 10))
            log(f"measured {dt * 1e3:.1f} ms/step ({x.numel() / dt:,.0f} tokens/s), val eval {per_eval:.2f} s "
                f"-> {total} steps in {args.minutes:g} min (warmup {warmup})")

        if step % args.log_every == 0 or step == 1 or step == total:
            loss_val = float(outp.loss.item())
            aux = float(outp.aux_loss.item()) if outp.aux_loss is not None else float("nan")
            log(f"step {step}/{total if total is not None else '?'}  loss {loss_val:.4f}  aux {aux:.3f}  "
                f"lr {lr:.2e}  tokens {tokens:,}  elapsed {time.monotonic() - t_train:.1f} s")
        if val_ids is not None and args.eval_every > 0 and (step % args.eval_every == 0 or step == total):
            vp = perplexity(model, val_ids, args.eval_seq_len, device, autocast=True)
            history.append({"step": step, "val_ppl": vp, "train_loss": float(outp.loss.item())})
            mark = ""
            if vp < best["val_ppl"]:
                best = {"val_ppl": vp, "step": step,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
                mark = " (best)"
            log(f"  val ppl {vp:.2f} at step {step}{mark}")
    sync()
    train_s = time.monotonic() - t_train
    final_loss = float(outp.loss.item())
    # final train loss over a few fresh batches (less noisy than one step)
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        losses = [float(model(input_ids=(xb := batch_at()), labels=xb, use_cache=False).loss) for _ in range(4)]
    train_loss_eval = sum(losses) / len(losses)
    if val_ids is not None:
        vp = perplexity(model, val_ids, args.eval_seq_len, device, autocast=True)
        if vp < best["val_ppl"]:
            best = {"val_ppl": vp, "step": step, "state": None}
    if best["state"] is not None and best["step"] != step:
        log(f"restoring the best-validation weights of step {best['step']} (val ppl {best['val_ppl']:.2f})")
        model.load_state_dict(best["state"])
    log(f"trained {step} steps, {tokens:,} tokens in {train_s:.1f} s ({tokens / train_s:,.0f} tokens/s)")

    # ---- save (bf16) -------------------------------------------------------------------------------
    model = model.to(torch.bfloat16).eval()
    model.config.use_cache = True
    model.config.output_router_logits = False
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    ppl_bf16 = perplexity(model, heldout, args.eval_seq_len, device)
    log(f"bf16 perplexity on wikitext2_heldout.txt (seq_len {args.eval_seq_len}): {ppl_bf16:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / f, out / f)

    # ---- verify by reloading -----------------------------------------------------------------------
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).to(device).eval()
    tok2 = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok2(open(DATA / "wikitext2_heldout.txt", encoding="utf-8").read())["input_ids"] == heldout.tolist()
    ppl_reload = perplexity(reloaded, heldout, args.eval_seq_len, device)
    log(f"reloaded ({next(reloaded.parameters()).dtype}) perplexity: {ppl_reload:.3f} (in-memory {ppl_bf16:.3f})")
    if abs(ppl_reload - ppl_bf16) > 1e-3 * ppl_bf16:
        log("error: the reloaded checkpoint does not reproduce the in-memory perplexity")
        return 1

    result = {
        "seed": args.seed,
        "steps": step,
        "selected_step": best["step"] if best["state"] is not None else step,
        "tokens_seen": tokens,
        "train_tokens": int(train_ids.numel()),
        "epochs": round(tokens / train_ids.numel(), 2),
        "final_train_loss": round(final_loss, 4),
        "train_loss_eval": round(train_loss_eval, 4),
        "val_ppl_best": None if val_ids is None else round(best["val_ppl"], 3),
        "ppl_heldout_bf16": round(ppl_bf16, 4),
        "ppl_heldout_reloaded": round(ppl_reload, 4),
        "eval": {"file": "examples/data/wikitext2_heldout.txt", "seq_len": args.eval_seq_len,
                 "protocol": "non-overlapping windows, starts 0, L, 2L, ... < n - L; fp32 logits"},
        "hyperparameters": {"batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
                            "min_lr_frac": args.min_lr_frac, "warmup": warmup, "schedule": "linear warmup + cosine",
                            "weight_decay": args.weight_decay, "betas": [0.9, 0.95], "grad_clip": 1.0,
                            "attention_dropout": args.attention_dropout,
                            "residual_dropout": args.dropout, "router_aux_loss_coef": 0.01,
                            "val_frac": args.val_frac, "minutes": args.minutes,
                            "steps_arg": args.steps,
                            "autocast": "bf16"},
        "params": n_params,
        "val_history": history,
        "train_wall_s": round(train_s, 1),
        "total_wall_s": round(time.monotonic() - t_start, 1),
        "tokens_per_s": round(tokens / train_s),
        "device": dev_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    (out / "train_result.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    files = {p.name for p in out.iterdir()}
    if files != OUTPUT_FILES:
        log(f"error: unexpected output files: extra {sorted(files - OUTPUT_FILES)}, missing {sorted(OUTPUT_FILES - files)}")
        return 1
    for f in files:
        os.chmod(out / f, 0o644)
    size = sum((out / f).stat().st_size for f in files)
    log(f"wrote {out}: {', '.join(sorted(files))} ({size / 2**20:.2f} MiB total)")
    log(f"done in {time.monotonic() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
