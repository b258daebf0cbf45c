"""Routed capture on tiny models of every family: reproduces the experts output, counts, Hessians, hook hygiene."""
from __future__ import annotations

import pytest
import torch

from moequant.calibration.capture import ExpertCapture, LayerCapture, LinearCapture
from moequant.calibration.routing import RoutedBatch, expert_intermediate, expert_output, route_tokens
from moequant.models import detect_family, split_expert
from moequant.models.base import num_experts
from test_models import NAMES, build_tiny

class RefAccumulator:
    """Stand-in for ``moequant.ops.HessianAccumulator`` (float64, index_add of outer products)."""

    def __init__(self, num_experts, dim, device=None):
        self.hessians = torch.zeros(num_experts, dim, dim, dtype=torch.float64)
        self.counts = torch.zeros(num_experts, dtype=torch.int64)
        self.mass = torch.zeros(num_experts, dtype=torch.float64)

    def add(self, x, expert_ids, weights=None):
        assert x.is_floating_point() and expert_ids.dtype == torch.int32 and x.dim() == 2
        x, ids = x.double(), expert_ids.long()
        w = torch.ones(x.shape[0], dtype=torch.float64) if weights is None else weights.double()
        self.hessians.index_add_(0, ids, x[:, :, None] * x[:, None, :] * w[:, None, None])
        self.counts += torch.bincount(ids, minlength=self.counts.numel())
        self.mass.index_add_(0, ids, w)


def ref_factory(num_experts, dim, device):
    return RefAccumulator(num_experts, dim, device)


def naive_h(experts, fam, e, x):
    """Down_proj input of expert e for rows x, through the module's own gate function where available."""
    t = split_expert(experts, fam, e)
    if fam.layout == "standard":
        gu = x @ experts.gate_up_proj[e].t()
    else:
        gu = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(gu)
    gate, up = x @ t.gate.t(), x @ t.up.t()
    return fam.glu(experts, gate, up)


def run_model_capture(name, weighting="none", impl="eager", seed=0, ids=None):
    """One forward of a tiny model with an ExpertCapture on every MoE layer; returns per-call records."""
    model = build_tiny(name, seed=seed, experts_implementation=impl, scale=6.0 if name == "gpt_oss" else 2.0)
    fam = detect_family(model.config)
    records, caps, handles = [], [], []
    for layer in fam.layers(model):
        ex = fam.experts_of(layer)
        if ex is None:
            continue
        rec = {"experts": ex, "batches": [], "args": [], "outs": []}
        records.append(rec)
        caps.append(ExpertCapture(ex, fam, on_batch=rec["batches"].append, weighting=weighting,
                                  accumulator_factory=ref_factory))
        # independent observers registered after the capture: raw args and the module's output
        handles.append(ex.register_forward_pre_hook(
            lambda m, a, k, rec=rec: rec["args"].append([t.detach().clone() for t in (list(a) + list(k.values()))[:3]]),
            with_kwargs=True))
        handles.append(ex.register_forward_hook(lambda m, a, o, rec=rec: rec["outs"].append(o.detach().clone())))
    if ids is None:
        ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))
    try:
        for c in caps:
            c.attach()
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for c in caps:
            c.remove()
        for h in handles:
            h.remove()
    return model, fam, records, caps


@pytest.mark.parametrize("name", NAMES)
def test_capture_reproduces_experts_output(name):
    model, fam, records, caps = run_model_capture(name)
    assert records and all(len(r["batches"]) == 1 == len(r["outs"]) for r in records)
    for rec, cap in zip(records, caps):
        batch, out = rec["batches"][0], rec["outs"][0]
        hs, idx, w = rec["args"][0]
        E = cap.num_experts
        assert isinstance(batch, RoutedBatch) and batch.offsets.shape == (E + 1,)
        assert batch.expert_ids.dtype == torch.int32 and batch.weights.dtype == torch.float32
        assert torch.all(batch.expert_ids[1:] >= batch.expert_ids[:-1])
        recon = expert_output(rec["experts"], fam, batch)
        scale = out.abs().max().item()
        assert scale > 1e-3
        torch.testing.assert_close(recon, out.float().reshape(recon.shape), atol=2e-5 * max(scale, 1), rtol=1e-4)
        # counts == router choices (pads excluded)
        valid = idx[(idx >= 0) & (idx < E)]
        want = torch.bincount(valid.reshape(-1).long(), minlength=E)
        assert torch.equal(batch.counts.cpu(), want) and torch.equal(cap.gate_up.counts, want)
        assert torch.equal(cap.down.counts, want)
        # Hessians == naive per-expert x^T x (gate/up on x, down on h)
        hs2 = hs.reshape(-1, hs.shape[-1]).double()
        for e in range(E):
            tok, slot = torch.where(idx == e)
            x = hs2[tok]
            torch.testing.assert_close(cap.gate_up.hessians[e], x.T @ x, atol=1e-8, rtol=1e-5)
            h = naive_h(rec["experts"], fam, e, x.float()).double()
            torch.testing.assert_close(cap.down.hessians[e], h.T @ h, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_routing_weighted_hessians(name):
    model, fam, records, caps = run_model_capture(name, weighting="routing")
    for rec, cap in zip(records, caps):
        hs, idx, w = rec["args"][0]
        hs2 = hs.reshape(-1, hs.shape[-1]).double()
        for e in range(cap.num_experts):
            tok, slot = torch.where(idx == e)
            c = w.reshape(idx.shape[0], -1)[tok, slot].double()
            x = hs2[tok]
            torch.testing.assert_close(cap.gate_up.hessians[e], (x * c[:, None]).T @ x, atol=1e-8, rtol=1e-5)
            torch.testing.assert_close(cap.gate_up.mass[e], c.sum(), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss", "qwen2_moe"])
def test_default_experts_implementation(name):
    """Capture does not depend on experts_implementation: the pre-hook sees the same args (default dispatch)."""
    model, fam, records, caps = run_model_capture(name, impl=None)
    for rec in records:
        out, recon = rec["outs"][0], expert_output(rec["experts"], fam, rec["batches"][0])
        torch.testing.assert_close(recon, out.float(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name,attr", [("deepseek_v3", "e_score_correction_bias"), ("gpt_oss", "bias")])
def test_zero_token_expert_via_router(name, attr):
    model = build_tiny(name)
    fam = detect_family(model.config)
    layer = next(layer for layer in fam.layers(model) if fam.is_moe_layer(layer))
    with torch.no_grad():
        getattr(fam.router_of(layer), attr)[3] = -1e9
    cap = ExpertCapture(fam.experts_of(layer), fam, accumulator_factory=ref_factory)
    with cap, torch.no_grad():
        model(input_ids=torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1)))
    assert cap.gate_up.counts[3] == 0 and cap.gate_up.counts.sum() == 2 * 9 * 2
    assert torch.count_nonzero(cap.gate_up.hessians[3]) == 0 and torch.count_nonzero(cap.down.hessians[3]) == 0
    assert cap.gate_up.mass[3] == 0


def test_pads_and_zero_token_expert_direct_call():
    """Index value E is a "no expert" pad: dropped; an unchosen expert gets count 0 and a zero Hessian."""
    model = build_tiny("qwen3_moe", scale=2.0)
    fam = detect_family(model.config)
    ex = fam.experts_of(fam.layers(model)[0])
    E, T, k = 8, 13, 2
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(T, 32, generator=g)
    idx = torch.randint(0, E, (T, k), generator=g)
    idx[idx == 5] = 6
    idx[::3, 1] = E  # pads
    w = torch.rand(T, k, generator=g)
    # Not every eager module accepts the pad value (transformers 5.17 one_hot(num_classes=E) does not), so the
    # reference is the module run with pads replaced by expert 0 at weight 0, which contributes nothing.
    pad = idx >= E
    with torch.no_grad():
        out = ex(hs, idx.masked_fill(pad, 0), w.masked_fill(pad, 0.0))
    b = route_tokens(hs, idx, w, E)
    b.h = expert_intermediate(ex, fam, b)
    assert b.x.shape[0] == int((~pad).sum()) and int(b.counts[5]) == 0
    torch.testing.assert_close(expert_output(ex, fam, b), out, atol=1e-5, rtol=1e-4)
    seen = []
    with ExpertCapture(ex, fam, on_batch=seen.append, accumulator_factory=ref_factory) as cap, torch.no_grad():
        ex(hs, idx.masked_fill(pad, 1), w)
    assert cap.gate_up.counts[5] == 0 and torch.count_nonzero(cap.down.hessians[5]) == 0
    assert torch.count_nonzero(cap.gate_up.hessians[1]) > 0
    # kwargs call and token mask
    mask = torch.ones(T, dtype=torch.bool)
    mask[:4] = False
    with ExpertCapture(ex, fam, on_batch=seen.append, accumulator_factory=ref_factory) as cap2, torch.no_grad():
        cap2.token_mask = mask
        ex(hidden_states=hs, top_k_index=idx.masked_fill(pad, 1), top_k_weights=w)
    assert seen[1].x.shape[0] == (T - 4) * k and bool((seen[1].token_index >= 4).all())


def _route_tokens_reference(hs, idx, w, num, mask=None):
    """route_tokens' selection as first written (boolean masks, bincount), for ``[T, H]`` rows and ``[T, k]``
    ids and weights: the twin the faster form must equal."""
    k = idx.shape[1]
    flat = idx.reshape(-1)
    tok = torch.arange(hs.shape[0]).repeat_interleave(k)
    valid = (flat >= 0) & (flat < num)
    if mask is not None:
        valid &= mask.bool().repeat_interleave(k)
    ids = flat[valid]
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids[order], minlength=num)
    return hs[tok[valid][order]], ids[order], w.reshape(-1)[valid][order].float(), tok[valid][order], counts


@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("masked", [False, True])
def test_route_tokens_equals_its_reference(k, masked):
    """Pads (ids outside [0, E), negative too), masked tokens, experts without rows, ties kept in token order."""
    g = torch.Generator().manual_seed(k)
    T, E = 37, 6
    hs = torch.randn(T, 16, generator=g)
    idx = torch.randint(-1, E + 2, (T, k), generator=g)
    idx[idx == 3] = 4  # expert 3 sees no row
    w = torch.rand(T, k, generator=g)
    mask = torch.rand(T, generator=g) > 0.3 if masked else None
    b = route_tokens(hs, idx, w, E, mask)
    x, ids, wt, tok, counts = _route_tokens_reference(hs, idx, w, E, mask)
    assert torch.equal(b.x, x) and torch.equal(b.expert_ids, ids.to(torch.int32)) and torch.equal(b.weights, wt)
    assert torch.equal(b.token_index, tok) and torch.equal(b.counts, counts) and int(counts[3]) == 0
    assert b.offsets[0] == 0 and b.offsets[-1] == ids.numel() and b.num_tokens == T


def test_route_tokens_dense_scores():
    """[T, E] dense routing scores (older GPT-OSS router) are gathered at the chosen slots."""
    idx = torch.tensor([[0, 2], [1, 0], [2, 3]])
    dense = torch.rand(3, 4)
    b = route_tokens(torch.randn(3, 5), idx, dense, 4)
    ref = route_tokens(torch.randn(3, 5), idx, dense.gather(1, idx), 4)
    assert torch.equal(b.weights, ref.weights) and b.offsets.tolist() == [0, 2, 3, 5, 6]


def test_route_tokens_keeps_the_activation_dtype():
    """bf16 hidden states stay bf16 in the batch (the CUDA Hessian kernels read them as they are); the routing is
    that of the same values in float32, and the expert intermediate is computed in fp32 from the widened values."""
    model = build_tiny("qwen3_moe", scale=2.0)
    fam = detect_family(model.config)
    ex = fam.experts_of(fam.layers(model)[0])
    g = torch.Generator().manual_seed(5)
    hs = torch.randn(13, 32, generator=g).to(torch.bfloat16)
    idx = torch.randint(0, 8, (13, 2), generator=g)
    w = torch.rand(13, 2, generator=g)
    b, b32 = route_tokens(hs, idx, w, 8), route_tokens(hs.float(), idx, w, 8)
    assert b.x.dtype == torch.bfloat16 and b.weights.dtype == torch.float32
    assert torch.equal(b.x.float(), b32.x) and torch.equal(b.x, hs[b.token_index])
    for name in ("token_index", "expert_ids", "weights", "offsets"):
        assert torch.equal(getattr(b, name), getattr(b32, name)), name
    h = expert_intermediate(ex, fam, b)
    assert h.dtype == torch.float32 and torch.equal(h, expert_intermediate(ex, fam, b32))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk_bytes", [1, 3000, 1 << 30])  # one expert per GEMM, a few, all at once
def test_expert_intermediate_batched_equals_per_expert(name, chunk_bytes):
    """The batched path (runs of experts padded into one bmm each) gives every routed row the per-expert path's
    h, for every family (gate rows first or interleaved, transposed layout, biases), with experts that see no rows
    (also at the start and the end), pads, and runs cut by ``chunk_bytes``."""
    model = build_tiny(name, scale=2.0)
    fam = detect_family(model.config)
    ex = next(e for e in map(fam.experts_of, fam.layers(model)) if e is not None)
    E = num_experts(ex)
    g = torch.Generator().manual_seed(11)
    hs = torch.randn(29, model.config.hidden_size, generator=g)
    idx = torch.randint(1, E - 1, (29, 2), generator=g)  # experts 0 and E - 1 see no rows
    idx[::4, 1] = E  # a pad
    idx[:3, 0] = 2  # expert 2 sees more rows than the others
    b = route_tokens(hs, idx, torch.rand(29, 2, generator=g), E)
    ref = expert_intermediate(ex, fam, b, batched=False)
    got = expert_intermediate(ex, fam, b, batched=True, chunk_bytes=chunk_bytes)
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_expert_runs_cover_every_routed_row_within_the_limit():
    from moequant.calibration.routing import _expert_runs

    off = [0, 0, 5, 5, 6, 16, 16, 17, 17]  # counts 0 5 0 1 10 0 1 0
    runs = list(_expert_runs(off, 4, 60))
    assert runs == [(1, 4, 5), (4, 5, 10), (6, 8, 1)]  # empty experts before a run skipped; 10 rows alone exceed 60 B
    for first, stop, rows in runs:
        assert rows == max(off[e + 1] - off[e] for e in range(first, stop))
        assert stop - first == 1 or (stop - first) * rows * 4 <= 60
    rows_covered = sum(off[stop] - off[first] for first, stop, _ in runs)
    assert rows_covered == off[-1]
    assert list(_expert_runs([0, 0, 0], 4, 60)) == []


def _no_hooks(model):
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_hooks_removed_after_exit_and_exception():
    model = build_tiny("qwen2_moe")
    fam = detect_family(model.config)
    layer = fam.layers(model)[0]
    with LayerCapture(layer, fam, accumulator_factory=ref_factory, shared_weighting="gate") as cap:
        assert not _no_hooks(model) and cap.attached
    assert _no_hooks(model) and not cap.attached
    with pytest.raises(RuntimeError, match="boom"):
        with LayerCapture(layer, fam, accumulator_factory=ref_factory), torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]))
            raise RuntimeError("boom")
    assert _no_hooks(model)

    def bad_callback(batch):
        raise ValueError("callback failed")
    ex = fam.experts_of(layer)
    with pytest.raises(ValueError, match="callback failed"):
        with ExpertCapture(ex, fam, on_batch=bad_callback, accumulate=False), torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]))
    assert _no_hooks(model)
    with pytest.raises(ValueError):
        ExpertCapture(ex, fam, weighting="bogus", accumulator_factory=ref_factory)


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3", "qwen3_next"])
def test_layer_capture_linears(name):
    """Linear Hessians == x^T x of each module's input; gated shared expert weighted by sigmoid(gate(x))."""
    model = build_tiny(name)
    fam = detect_family(model.config)
    idx = next(i for i, layer in enumerate(fam.layers(model)) if fam.is_moe_layer(layer))
    layer = fam.layers(model)[idx]
    prefix = fam.layer_prefix(model, idx)
    inputs, handles = {}, []
    named = dict(model.named_modules())
    cap = LayerCapture(layer, fam, layer_prefix=prefix, accumulator_factory=ref_factory, shared_weighting="gate")
    def record(store, key):  # a pre-hook must return None, or it replaces the input
        def hook(m, a):
            store.setdefault(key, a[0].reshape(-1, a[0].shape[-1]).detach().clone())
        return hook
    for n in cap.linears.modules:
        handles.append(named[n].register_forward_pre_hook(record(inputs, n)))
    block_in = {}
    handles.append(named[f"{prefix}.{fam.moe_block}"].register_forward_pre_hook(record(block_in, "x")))
    try:
        with cap, torch.no_grad():
            model(input_ids=torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(2)))
    finally:
        for h in handles:
            h.remove()
    assert set(inputs) == set(cap.linears.modules) and cap.experts is not None
    c = None
    if fam.shared_expert_gate:
        with torch.no_grad():
            c = torch.sigmoid(fam.shared_expert_gate_of(layer)(block_in["x"])).double().reshape(-1)
    for n, x in inputs.items():
        x = x.double()
        acc = cap.linears.accumulators[n]
        weighted = c is not None and f".{fam.shared_expert}." in n
        want = (x * c[:, None]).T @ x if weighted else x.T @ x
        torch.testing.assert_close(acc.hessians[0], want, atol=1e-8, rtol=1e-5)
        assert acc.counts[0] == x.shape[0]
    if c is not None:
        assert any(f".{fam.shared_expert}." in n for n in inputs)


def test_qwen3moe_tiny_layer0_reproduced(shared_tiny_model):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(shared_tiny_model, dtype=torch.float32,
                                                              experts_implementation="eager").eval()
    fam = detect_family(model.config)
    assert fam.name == "qwen3_moe"
    fam.validate(model)
    layer = fam.layers(model)[0]
    ex = fam.experts_of(layer)
    outs, batches = [], []
    h = ex.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    ids = torch.randint(0, model.config.vocab_size, (3, 48), generator=torch.Generator().manual_seed(0))
    try:
        with LayerCapture(layer, fam, layer_prefix="model.layers.0", on_batch=batches.append,
                          accumulator_factory=ref_factory) as cap, torch.no_grad():
            model(input_ids=ids)
    finally:
        h.remove()
    recon = expert_output(ex, fam, batches[0])
    torch.testing.assert_close(recon, outs[0], atol=1e-4 * outs[0].abs().max().item(), rtol=1e-4)
    counts = cap.experts.gate_up.counts
    assert int(counts.sum()) == 3 * 48 * model.config.num_experts_per_tok
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"} <= set(cap.linears.accumulators)


def test_real_accumulator_if_built():
    """With the compiled core present, the default factory (moequant.ops.HessianAccumulator) matches the stand-in."""
    try:
        from moequant import ops
        ops.HessianAccumulator(1, 2).add(torch.ones(1, 2), torch.zeros(1, dtype=torch.int32))
    except Exception as exc:  # extension not built (or a stub): nothing to compare against
        pytest.skip(f"moequant.ops.HessianAccumulator unavailable: {exc}")
    model = build_tiny("qwen3_moe", scale=2.0)
    fam = detect_family(model.config)
    ex = fam.experts_of(fam.layers(model)[0])
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(5))
    with ExpertCapture(ex, fam, weighting="routing") as real, \
            ExpertCapture(ex, fam, weighting="routing", accumulator_factory=ref_factory) as ref, torch.no_grad():
        model(input_ids=ids)
    assert torch.equal(real.gate_up.counts.cpu(), ref.gate_up.counts)
    torch.testing.assert_close(real.gate_up.hessians.double().cpu(), ref.gate_up.hessians, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(real.down.hessians.double().cpu(), ref.down.hessians, atol=1e-5, rtol=1e-4)


def test_linears_reading_one_input_share_a_hessian():
    """q/k/v (and the shared expert's gate/up) accumulate once; the Hessians equal separate accumulation."""
    model = build_tiny("qwen2_moe")
    fam = detect_family(model.config)
    layer, prefix = fam.layers(model)[0], fam.layer_prefix(model, 0)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    caps = {}
    for share in (True, False):
        cap = LayerCapture(layer, fam, layer_prefix=prefix, accumulator_factory=ref_factory, shared_weighting="gate")
        cap.linears.share_inputs = share
        with cap, torch.no_grad():
            model(input_ids=ids)
            model(input_ids=ids[:, :5])  # later forwards check the sharing decided in the first one
        caps[share] = cap.linears
    a = f"{prefix}.self_attn."
    s = f"{prefix}.mlp.shared_expert."
    assert caps[True].shares == {a + "k_proj": a + "q_proj", a + "v_proj": a + "q_proj",
                                 s + "up_proj": s + "gate_proj"}
    assert caps[False].shares == {}
    assert caps[True].accumulators[a + "v_proj"] is caps[True].accumulators[a + "q_proj"]
    for n, acc in caps[False].accumulators.items():
        torch.testing.assert_close(caps[True].accumulators[n].hessians, acc.hessians, atol=1e-10, rtol=1e-10)
        assert int(caps[True].accumulators[n].counts[0]) == int(acc.counts[0]) == 2 * 7 + 2 * 5


def test_linear_sharing_broken_later_is_an_error():
    lin_a, lin_b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)
    cap = LinearCapture({"a": lin_a, "b": lin_b}, accumulator_factory=ref_factory)
    x = torch.randn(5, 4)
    with cap, torch.no_grad():
        lin_a(x), lin_b(x)  # first forward: b shares a's Hessian
        lin_a(x)
        with pytest.raises(RuntimeError, match="b received the same input as a.*share_inputs=False"):
            lin_b(x.clone())
    assert cap.shares == {"b": "a"}
    torch.testing.assert_close(cap.accumulators["a"].hessians[0], 2 * x.double().T @ x.double())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])  # gate rows first / interleaved, transposed layout
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 27])  # the batched path: one expert per bmm, all in one
def test_expert_intermediate_half_on_cuda_matches_fp32(name, dtype, chunk_bytes):
    """A 16-bit layer on a GPU: expert_intermediate takes the tensor cores (fp32 output of 16-bit products) instead
    of the fp32 GEMM of widened copies; the products are exact, only the summation order differs."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = build_tiny(name).to("cuda", dtype)
    fam = detect_family(model)
    experts = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    g = torch.Generator().manual_seed(3)
    E = num_experts(experts)
    hs = torch.randn(40, model.config.hidden_size, generator=g).to("cuda", dtype)
    idx = torch.randint(0, E + 1, (40, 2), generator=g).cuda()  # E: a pad
    idx[:, 1] = torch.where(idx[:, 1] == 0, E, idx[:, 1])  # expert 0 sees fewer rows; some see none
    w = torch.rand(40, 2, generator=g).cuda()
    batch = route_tokens(hs, idx, w, E)
    fast = expert_intermediate(experts, fam, batch, chunk_bytes=chunk_bytes)
    batch_ref = route_tokens(hs, idx, w, E)
    ref = torch.zeros_like(fast)
    off = batch_ref.offsets.tolist()
    for e in range(E):
        a, b = off[e], off[e + 1]
        if b > a:
            t = split_expert(experts, fam, e)
            x = batch_ref.x[a:b].float()
            gate, up = x @ t.gate.float().t(), x @ t.up.float().t()
            if t.gate_bias is not None:
                gate, up = gate + t.gate_bias.float(), up + t.up_bias.float()
            ref[a:b] = fam.glu(experts, gate, up)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk", [5, 1 << 15])
def test_grouped_output_equals_the_module_on_a_group_view(name, chunk):
    """The expert streaming engine's group outputs from the routed rows only (grouped GEMMs) against the experts
    module's own forward on a view with pads (ids == E): the same bf16 products, summed per token in fp32 instead
    of rounded to bf16 once per call."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from moequant.calibration.routing import grouped_output_into
    from moequant.pipeline.experts import expert_view

    model = build_tiny(name).to("cuda", torch.bfloat16)
    fam = detect_family(model)
    experts = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    E = num_experts(experts)
    view = expert_view(experts, slice(0, E), "cuda")
    g = torch.Generator().manual_seed(11)
    hs = torch.randn(60, model.config.hidden_size, generator=g).to("cuda", torch.bfloat16)
    idx = torch.randint(1, E + 1, (60, 2), generator=g).cuda()  # E: a pad (another group's expert); 0: no row
    w = torch.rand(60, 2, generator=g).cuda()
    acc = torch.zeros(60, hs.shape[1], device="cuda")
    if not grouped_output_into(view, fam, hs, idx, w, acc, chunk_rows=chunk):
        pytest.skip(f"{name}: the module has no grouped form (no gate or a post-expert norm)")
    pads = idx == E
    if fam.name == "gpt_oss":  # its eager forward one-hot encodes ids in E classes: a pad is out of range (a device
        idx, w = torch.where(pads, 0, idx), torch.where(pads, 0.0, w)  # assert); expert 0 with weight 0 adds 0
    ref = view(hs, idx, w).float()
    scale = float(ref.abs().max())
    torch.testing.assert_close(acc, ref, atol=1e-2 * scale, rtol=1e-2)
    assert float((acc - ref).abs().max()) <= 2 ** -7 * scale  # bf16 rounding of the module's output, not more


@pytest.mark.parametrize("name", NAMES)
def test_grouped_output_is_as_close_to_fp32_as_the_module(name):
    """grouped_output_into's chunking and row-range clipping on the CPU (torch's grouped_mm runs bf16 there too):
    against the float32 definition (per routed pair, glu of the fp32 products, times the routing weight), with
    chunks that cut experts' row ranges; ids == E are pads, expert 0 sees no row."""
    from moequant.calibration.routing import grouped_output_into

    if getattr(torch.nn.functional, "grouped_mm", None) is None:
        pytest.skip("torch without torch.nn.functional.grouped_mm")
    model = build_tiny(name).to(torch.bfloat16)
    fam = detect_family(model)
    experts = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    E = num_experts(experts)
    g = torch.Generator().manual_seed(11)
    hs = torch.randn(40, model.config.hidden_size, generator=g).to(torch.bfloat16)
    idx = torch.randint(1, E + 1, (40, 2), generator=g)
    w = torch.rand(40, 2, generator=g)
    ref = torch.zeros(40, hs.shape[1])
    for t in range(40):
        for k in range(2):
            e = int(idx[t, k])
            if e == E:
                continue
            te = split_expert(experts, fam, e)
            x = hs[t:t + 1].float()
            gate, up = x @ te.gate.float().t(), x @ te.up.float().t()
            if te.gate_bias is not None:
                gate, up = gate + te.gate_bias.float(), up + te.up_bias.float()
            y = fam.glu(experts, gate, up) @ te.down.float().t()
            ref[t] += float(w[t, k]) * (y[0] + (te.down_bias.float() if te.down_bias is not None else 0))
    scale = float(ref.abs().max())
    for chunk in (3, 1 << 15):
        acc = torch.zeros(40, hs.shape[1])
        assert grouped_output_into(experts, fam, hs, idx, w, acc, chunk_rows=chunk)
        assert float((acc - ref).abs().max()) <= 1e-2 * scale, (chunk, float((acc - ref).abs().max()) / scale)
    assert not grouped_output_into(experts, fam, hs.float(), idx, w, torch.zeros(40, hs.shape[1]))  # fp32 rows
