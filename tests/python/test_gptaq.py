"""GPTAQ-style asymmetric calibration of the routed experts' down_proj (moequant.ops.gptaq, moequant.ref.gptaq,
moequant.pipeline.gptaq, the recipe's ``gptaq`` section):

- the fast path (joint-row Hessian, batched targets) against the float64 twin, with a zero-token expert and a dead
  column; alpha = 0 is the plain solve bit for bit;
- on synthetic data with x~ != x the corrected solve has a lower sum c ||W x - Q x~||^2 than plain GPTQ;
- the pipeline on tiny random models of several families: gate/up unchanged, down_proj changed, groups of 1 equal
  one group, starved experts keep the plain (fallback) solve, a killed run resumes bit-identically;
- every error path of the section.
"""
from __future__ import annotations

import pytest
import torch

from checkpoints import checkpoint_tensors
from family_checkpoints import CALIB_TEXT, family_checkpoint

from moequant import ops, pipeline
from moequant.ops.gptaq import gptaq_targets, joint_rows, split_joint
from moequant.pipeline import gptaq as gptaq_pipeline
from moequant.recipe import GPTAQConfig, Recipe
from moequant.ref.gptaq import asymmetric_loss_ref, asymmetric_statistics_ref, gptaq_target_ref

CALIBRATION = {"num_samples": 4, "seq_len": 64, "batch_size": 2}


def _recipe(**kw) -> Recipe:
    return Recipe.from_dict({"calibration": CALIBRATION, **kw})


def _rows(n: int, dim: int, seed: int, noise: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g) * torch.linspace(0.2, 2.0, dim)
    mix = torch.randn(dim, dim, generator=g) / dim ** 0.5
    x_t = x + noise * x @ mix + 0.05 * torch.randn(n, dim, generator=g)  # correlated with x, as quantized inputs are
    c = torch.rand(n, generator=g) * 0.9 + 0.1
    return x, x_t, c


# ---------------------------------------------------------------------------------------------- math vs twin

def test_joint_hessian_and_targets_match_the_twin():
    dim, out = 24, 10
    e_num = 4
    xs = [_rows(n, dim, seed=e) for e, n in enumerate((40, 0, 33, 50))]  # expert 1: no token
    xs[3][1][:, 5] = 0.0  # expert 3: a dead column of x~
    acc = ops.HessianAccumulator(e_num, 2 * dim, dtype=torch.float64)
    for e, (x, xt, c) in enumerate(xs):
        if x.shape[0]:
            acc.add(joint_rows(x, xt), torch.full((x.shape[0],), e, dtype=torch.int32), c)
    h, cross = split_joint(acc.hessians)
    mass = acc.mass.double()
    h_n = torch.stack([h[e] / mass[e] if mass[e] > 0 else h[e] for e in range(e_num)])
    c_n = torch.stack([cross[e] / mass[e] if mass[e] > 0 else cross[e] for e in range(e_num)])
    w = torch.randn(e_num, out, dim, generator=torch.Generator().manual_seed(9))
    got = gptaq_targets(w, h_n, c_n, alpha=0.7, damp=0.05)
    for e, (x, xt, c) in enumerate(xs):
        rh, rc = asymmetric_statistics_ref(x, xt, c)
        torch.testing.assert_close(h_n[e], rh, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c_n[e], rc, rtol=1e-5, atol=1e-6)
        want = gptaq_target_ref(w[e], rh, rc, 0.7, 0.05)
        torch.testing.assert_close(got[e].double(), want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got[1], w[1])  # no token: W itself
    assert not torch.equal(got[0], w[0])


@pytest.mark.parametrize("shrink", [False, True])
def test_normalised_statistics_match_the_twin(shrink):
    """Plain: divided by the mass. Shrink: the target counts as k rows on which x = x~ (the twin on the real rows
    plus pseudo-rows of the target with weight k in all)."""
    from moequant.ops.gptaq import normalised_statistics

    x, xt, c = _rows(30, 12, seed=6)
    acc = ops.HessianAccumulator(1, 24, dtype=torch.float64)
    acc.add(joint_rows(x, xt), torch.zeros(30, dtype=torch.int32), c)
    k = 5.0
    z = torch.randn(40, 12, generator=torch.Generator().manual_seed(7))
    target = (z.double().T @ z.double()) / 40
    h, cr = normalised_statistics(acc.hessians[0], float(acc.mass[0]), k, target if shrink else None)
    if shrink:
        rh, rc = asymmetric_statistics_ref(torch.cat([x, z]), torch.cat([xt, z]),
                                           torch.cat([c, torch.full((40,), k / 40)]))
    else:
        rh, rc = asymmetric_statistics_ref(x, xt, c)
    torch.testing.assert_close(h, rh, rtol=1e-6, atol=1e-7 * float(rh.abs().max()))
    torch.testing.assert_close(cr, rc, rtol=1e-5, atol=1e-5 * float(rc.abs().max()))


def test_alpha_zero_is_the_plain_solve_bit_for_bit():
    x, xt, c = _rows(64, 32, seed=1)
    h, cross = asymmetric_statistics_ref(x, xt, c)
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(2)).bfloat16()
    t = gptaq_targets(w[None], h[None].float(), cross[None].float(), alpha=0.0, damp=0.1)[0]
    assert torch.equal(t, w.float())
    assert torch.equal(gptaq_target_ref(w, h, cross, 0.0, 0.1), w.double())
    a = ops.gptq_quantize(t, h.float(), bits=3, group_size=16, damp=0.1)
    b = ops.gptq_quantize(w.float(), h.float(), bits=3, group_size=16, damp=0.1)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("bits", [3, 4])
def test_corrected_solve_lowers_the_asymmetric_error(bits):
    x, xt, c = _rows(512, 64, seed=3, noise=0.3)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    h, cross = asymmetric_statistics_ref(x, xt, c)
    h_plain = asymmetric_statistics_ref(x, x, c)[0]
    target = gptaq_targets(w[None], h[None].float(), cross[None].float(), alpha=1.0, damp=0.01)[0]
    kw = dict(bits=bits, group_size=16, damp=0.01)
    q_plain = ops.gptq_quantize(w, h_plain.float(), **kw).dequantized  # GPTQ on the original inputs
    q_seq = ops.gptq_quantize(w, h.float(), **kw).dequantized  # on the quantized inputs, W as target
    q_gptaq = ops.gptq_quantize(target, h.float(), **kw).dequantized
    loss = {k: asymmetric_loss_ref(w, q, x, xt, c) for k, q in (("plain", q_plain), ("seq", q_seq),
                                                                 ("gptaq", q_gptaq))}
    assert loss["gptaq"] < 0.8 * min(loss["plain"], loss["seq"]), loss
    # the unquantized least-squares optimum is the target itself
    best = asymmetric_loss_ref(w, gptaq_target_ref(w, h, cross, 1.0, 0.0), x, xt, c)
    assert best < asymmetric_loss_ref(w, w, x, xt, c)


def test_damped_target_is_the_ridge_least_squares_solution():
    """W* = argmin_Q sum c ||W x - Q x~||^2 / m + lambda ||Q - W||^2 (lambda = damp * mean diag H~): the twin
    against a direct least-squares solve of the stacked system."""
    x, xt, c = _rows(80, 16, seed=8, noise=0.4)
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(9)).double()
    h, cross = asymmetric_statistics_ref(x, xt, c)
    damp = 0.1
    lam = damp * float(torch.diagonal(h).mean())
    s = (c.double() / c.double().sum()).sqrt()[:, None]
    a = torch.cat([xt.double() * s, lam ** 0.5 * torch.eye(16, dtype=torch.float64)])  # rows: Q^T's equations
    b = torch.cat([(x.double() @ w.T) * s, lam ** 0.5 * w.T])
    want = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(gptaq_target_ref(w, h, cross, 1.0, damp), want, rtol=1e-9, atol=1e-9)


def test_targets_reject_bad_shapes():
    with pytest.raises(ValueError, match="gptaq_targets: expected w"):
        gptaq_targets(torch.zeros(2, 3, 4), torch.zeros(2, 4, 4), torch.zeros(2, 3, 3), 1.0, 0.1)
    with pytest.raises(ValueError, match="x, x_tilde"):
        asymmetric_statistics_ref(torch.zeros(3, 4), torch.zeros(3, 5))


# ---------------------------------------------------------------------------------------------- recipe

def test_recipe_section_round_trips(tmp_path):
    r = _recipe(gptaq={"enabled": True, "alpha": 0.5, "modules": ["attention", "routed"]})
    assert r.gptaq == GPTAQConfig(enabled=True, alpha=0.5, modules=["attention", "routed"])
    for suffix in ("json", "yaml"):
        r.save(tmp_path / f"r.{suffix}")
        assert Recipe.load(tmp_path / f"r.{suffix}").gptaq == r.gptaq
    assert Recipe().gptaq == GPTAQConfig(enabled=False, alpha=0.5, modules=["routed", "shared", "attention"])


@pytest.mark.parametrize("section,needle", [
    ({"enabled": "yes"}, "gptaq.enabled: expected true or false, got 'yes'"),
    ({"enabled": True, "alpha": -0.1}, "gptaq.alpha: expected a number in [0, 2], got -0.1"),
    ({"alpha": 2.5}, "gptaq.alpha: expected a number in [0, 2], got 2.5"),
    ({"alpha": True}, "gptaq.alpha: expected a number in [0, 2], got True"),
    ({"alpha": float("nan")}, "gptaq.alpha: expected a number in [0, 2], got nan"),
    ({"beta": 1}, "gptaq: unknown key(s) 'beta'; known keys: enabled, alpha, modules"),
    ({"modules": []}, "gptaq.modules: expected a non-empty list of distinct names of 'routed', 'shared', 'attention', "
                      "got []"),
    ({"modules": ["routed", "mlp"]}, "gptaq.modules: expected a non-empty list"),
    ({"modules": ["routed", "routed"]}, "gptaq.modules: expected a non-empty list"),
    ({"modules": "routed"}, "gptaq.modules: expected a non-empty list"),
])
def test_section_errors(section, needle):
    with pytest.raises(ValueError) as e:
        _recipe(gptaq=section)
    assert needle in str(e.value)


def test_set_after_construction_is_checked_again():
    r = _recipe()
    r.gptaq.alpha = 3
    with pytest.raises(ValueError, match=r"gptaq\.alpha: expected a number in \[0, 2\], got 3"):
        r.validate()


def test_refused_with_a_budget():
    with pytest.raises(ValueError, match="gptaq.enabled: expected false with a budget, got True; the budget"):
        _recipe(gptaq={"enabled": True}, budget={"bits": 4.5})


# ---------------------------------------------------------------------------------------------- pipeline

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptaq-models")
    return lambda name: family_checkpoint(name, root)


def _quantize(src, recipe, out, **kw):
    return pipeline.quantize(str(src), recipe, calibration=str(CALIB_TEXT), output_dir=out, progress=False, **kw)


def _layer0(t: dict, proj: str) -> dict:
    return {k: v for k, v in t.items() if k.startswith("model.layers.0.") and ".experts." in k and proj in k}


def _down(name: str) -> bool:
    return name.rsplit(".", 2)[-2] in ("down_proj", "w2")


def _kind(name: str) -> str:
    """Which solve a checkpoint tensor of a MoE layer comes from: routed down, shared down, attention output, other."""
    module = name.rsplit(".", 1)[0]
    if ".experts." in name and ".shared_expert" not in name:
        return "routed_down" if _down(name) else "other"
    if "shared_expert" in name and _down(name):
        return "shared_down"
    if module.rsplit(".", 1)[-1] in ("o_proj", "out_proj") and "att" in module:
        return "attention_out"
    return "other"


@pytest.mark.parametrize("family,kinds", [("qwen3_moe", {"routed_down", "attention_out"}),
                                          ("mixtral", {"routed_down", "attention_out"}),
                                          ("gpt_oss", {"routed_down", "attention_out"}),
                                          ("qwen2_moe", {"routed_down", "attention_out", "shared_down"}),
                                          ("deepseek_v3", {"routed_down", "attention_out", "shared_down"})])
def test_pipeline_changes_the_deferred_matrices_only_and_groups_match(models, family, kinds, tmp_path):
    """The routed experts' down_proj, the attention's o_proj and the shared expert's down_proj change; every other
    tensor of the first MoE layer is the plain solve's; groups of 1 equal one group."""
    src = models(family)
    scheme = {"bits": 3, "group_size": 32}
    plain = checkpoint_tensors(_out(src, _recipe(scheme=scheme), tmp_path / "p"))
    a = checkpoint_tensors(_out(src, _recipe(scheme=scheme, gptaq={"enabled": True}), tmp_path / "a"))
    b = checkpoint_tensors(_out(src, _recipe(scheme=scheme, gptaq={"enabled": True}, experts_per_group=1),
                                tmp_path / "b"))
    layer = min(int(k.split(".")[2]) for k in a if ".experts." in k and k.startswith("model.layers."))
    first = [k for k in a if k.startswith(f"model.layers.{layer}.")]  # the first MoE layer
    changed = {_kind(k) for k in first if not torch.equal(a[k], plain[k])}
    assert changed == kinds, (changed, [k for k in first if not torch.equal(a[k], plain[k])][:6])
    assert all(torch.equal(a[k], b[k]) for k in first)  # groups of 1 == one group (same inputs, same sums)


@pytest.mark.parametrize("modules", [["routed"], ["shared"], ["attention"], ["shared", "attention"]])
def test_modules_select_the_matrices(models, modules, tmp_path):
    src = models("qwen2_moe")
    scheme = {"bits": 3, "group_size": 32}
    plain = checkpoint_tensors(_out(src, _recipe(scheme=scheme), tmp_path / "p"))
    a = checkpoint_tensors(_out(src, _recipe(scheme=scheme, gptaq={"enabled": True, "modules": modules}),
                                tmp_path / "a"))
    first = [k for k in a if k.startswith("model.layers.0.")]
    changed = {_kind(k) for k in first if not torch.equal(a[k], plain[k])}
    names = {"routed": "routed_down", "shared": "shared_down", "attention": "attention_out"}
    assert changed == {names[m] for m in modules}


def _out(src, recipe, out):
    _quantize(src, recipe, out)
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_joint_hessians_of_an_experts_module_match_the_twin(family):
    """The pipeline's accumulation (pass 1's calls through a view, original vs quantized gate/up) against the
    twin's statistics of the routed rows, expert by expert (an unrouted expert: zeros; pads dropped)."""
    from moequant.calibration.routing import expert_glu
    from moequant.models import detect_family, split_expert
    from moequant.models.base import num_experts
    from test_models import build_tiny

    model = build_tiny(family, scale=2.0)
    fam = detect_family(model.config)
    ex = fam.experts_of(fam.layers(model)[0])
    n = num_experts(ex)
    original = gptaq_pipeline.original_copy(ex)
    with torch.no_grad():
        ex.gate_up_proj.add_(0.05 * torch.randn_like(ex.gate_up_proj))  # stands in for the quantized gate/up
    g = torch.Generator().manual_seed(5)
    hidden = ex.gate_up_proj.shape[-1 if fam.layout == "standard" else 1]
    calls = []
    for t in (7, 11):
        idx = torch.randint(0, n, (t, 2), generator=g)
        idx[idx == 1] = 2  # expert 1: no token
        idx[::4, 1] = n  # pads
        calls.append((torch.randn(t, hidden, generator=g), idx, torch.rand(t, 2, generator=g)))
    lut = torch.arange(n)
    acc = gptaq_pipeline.joint_hessians(ex, original, fam, calls, lut, True,
                                        lambda e, d, dev: ops.HessianAccumulator(e, d, dtype=torch.float64), "cpu")
    h, cross = split_joint(acc.hessians)
    for e in range(n):
        rows, cs = [], []
        for hs, idx, w in calls:
            tok, slot = (idx == e).nonzero(as_tuple=True)
            rows.append(hs[tok])
            cs.append(w[tok, slot])
        x_in, c = torch.cat(rows), torch.cat(cs)
        if not x_in.shape[0]:
            assert e == 1 and torch.count_nonzero(h[e]) == 0 and torch.count_nonzero(cross[e]) == 0
            continue
        with torch.no_grad():
            x = expert_glu(original, fam, split_expert(original, fam, e), x_in)
            xt = expert_glu(ex, fam, split_expert(ex, fam, e), x_in)
        rh, rc = asymmetric_statistics_ref(x, xt, c)
        m = float(acc.mass[e])
        # float32 rows (the difference x - x~ rounded once), float64 sums: relative to the matrices' scale
        torch.testing.assert_close(h[e] / m, rh, rtol=1e-5, atol=1e-5 * float(rh.abs().max()))
        torch.testing.assert_close(cross[e] / m, rc, rtol=1e-4, atol=1e-4 * float(rc.abs().max()))
        assert torch.count_nonzero(rc) > 0


@pytest.mark.parametrize("policy", ["mean", "rtn", "identity"])
def test_starved_experts_keep_the_plain_solve(policy, tmp_path):
    """Experts below min_tokens have no Hessian of their own (fallback): their down_proj is solved exactly as
    without gptaq (no correction); the calibrated experts' down_proj changes."""
    from testdata import tiny_qwen3_checkpoint

    src = tiny_qwen3_checkpoint(tmp_path / "m", num_experts=8)
    ids = torch.randint(0, 8000, (2, 16), generator=torch.Generator().manual_seed(3))
    base = {"scheme": {"group_size": 32, "bits": 3}, "fallback": {"min_tokens": 10, "policy": policy},
            "calibration": {"num_samples": 2, "seq_len": 16}}
    runs = {}
    for on in (False, True):
        r = Recipe.from_dict({**base, "gptaq": {"enabled": on}})
        report = pipeline.quantize(src, r, calibration=ids, output_dir=tmp_path / f"q{on}", progress=False)
        runs[on] = (checkpoint_tensors(tmp_path / f"q{on}"), report)
    (a, _), (b, report) = runs[False], runs[True]
    starved = {m.name.split("+")[0].rsplit(".", 2)[-2] for m in report.layers[0].modules if m.fallback}
    calibrated = {str(e) for e in range(8)} - starved
    assert starved and calibrated, "the test needs starved and calibrated experts"
    checked = 0
    for k in a:
        if k.startswith("model.layers.0.mlp.experts.") and ".down_proj." in k:
            e = k.split(".")[5]
            if e in starved:
                assert torch.equal(a[k], b[k]), k
                checked += 1
    assert checked == 3 * len(starved)  # packed, scale, shape of each
    assert any(not torch.equal(a[k], b[k]) for k in a
               if k.startswith("model.layers.0.mlp.experts.") and ".down_proj.weight_packed" in k
               and k.split(".")[5] in calibrated)


def test_shrink_policy_runs_and_corrects(tmp_path):
    from testdata import tiny_qwen3_checkpoint

    src = tiny_qwen3_checkpoint(tmp_path / "m", num_experts=4)
    ids = torch.randint(0, 8000, (2, 16), generator=torch.Generator().manual_seed(3))
    base = {"scheme": {"group_size": 32, "bits": 3}, "fallback": {"policy": "shrink"},
            "calibration": {"num_samples": 2, "seq_len": 16}}
    out = {}
    for size in (None, 1):
        for on in (False, True):
            r = Recipe.from_dict({**base, "gptaq": {"enabled": on}, "experts_per_group": size})
            pipeline.quantize(src, r, calibration=ids, output_dir=tmp_path / f"q{on}{size}", progress=False)
            out[on, size] = checkpoint_tensors(tmp_path / f"q{on}{size}")
    down = [k for k in out[True, None] if k.startswith("model.layers.0.mlp.experts.") and ".down_proj.weight_packed" in k]
    assert any(not torch.equal(out[True, None][k], out[False, None][k]) for k in down)
    first = [k for k in out[True, None] if k.startswith("model.layers.0.")]
    assert all(torch.equal(out[True, None][k], out[True, 1][k]) for k in first)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_targets_in_the_pipeline(models, tmp_path, monkeypatch, alpha):
    """alpha = 0: the down_proj targets are the original weights (bit for bit), only the Hessian is H~; alpha = 1:
    every target moves (C != 0: x came through the original gate/up, x~ through the quantized ones)."""
    seen = []
    original = gptaq_pipeline.gptaq_targets

    def spy(w, h, c, alpha_, damp, memory_gb=8.0):
        t = original(w, h, c, alpha_, damp, memory_gb)
        seen.extend(torch.equal(t[e], w[e].float()) for e in range(w.shape[0]))
        return t

    monkeypatch.setattr(gptaq_pipeline, "gptaq_targets", spy)
    _quantize(models("qwen3_moe"), _recipe(gptaq={"enabled": True, "alpha": alpha}), tmp_path / "z")
    assert seen and all(seen) if alpha == 0 else seen and not any(seen)


def test_off_is_absent_from_the_fingerprint(models, tmp_path):
    """gptaq off leaves the run's fingerprint as it was before the setting existed (old work directories resume)."""
    import json

    class Stop(pipeline.LayerObserver):
        def layer_done(self, index, result):
            raise KeyboardInterrupt

    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        _quantize(models("mixtral"), _recipe(gptaq={"enabled": False, "alpha": 0.3}), out, observers=[Stop()])
    manifest = json.loads((tmp_path / "q.partial" / "manifest.json").read_text())
    assert "gptaq" not in manifest["recipe"] and "awq" in manifest["recipe"]


def test_killed_run_resumes_bit_identically(models, tmp_path, monkeypatch):
    src = models("mixtral")  # 4 experts, groups of 1
    recipe = _recipe(experts_per_group=1, gptaq={"enabled": True, "alpha": 0.5})
    _quantize(src, recipe, tmp_path / "full")
    calls = {"n": 0}
    original = gptaq_pipeline.solve_group

    def crash_in_layer_1(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4 + 3:  # layer 0's 4 groups, layer 1's first 2, then the third
            raise KeyboardInterrupt("simulated kill in the middle of layer 1's expert groups")
        return original(*args, **kwargs)

    monkeypatch.setattr(gptaq_pipeline, "solve_group", crash_in_layer_1)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _quantize(src, recipe, out)
    monkeypatch.setattr(gptaq_pipeline, "solve_group", original)
    import json

    manifest = json.loads((out.with_name("resumed.partial") / "manifest.json").read_text())
    assert manifest["recipe"]["gptaq"]["alpha"] == 0.5  # part of the run's fingerprint when on
    with pytest.raises(ValueError, match=r"the recipe differs \(gptaq\)"):
        _quantize(src, _recipe(experts_per_group=1), out, resume=True)
    report = _quantize(src, recipe, out, resume=True)
    assert report.resumed_from_layer == 1
    a, b = checkpoint_tensors(tmp_path / "full"), checkpoint_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = Recipe.load(out / "moequant_recipe.json")  # the setting is saved with the checkpoint
    assert saved.gptaq == GPTAQConfig(enabled=True, alpha=0.5, modules=["routed", "shared", "attention"])


@pytest.mark.gpu
def test_targets_on_the_gpu_match_the_twin():
    dim, out, e_num = 96, 40, 5
    hs, cs, ws = [], [], []
    for e in range(e_num):
        x, xt, c = _rows(200 + 10 * e, dim, seed=20 + e)
        h, cr = asymmetric_statistics_ref(x, xt, c)
        hs.append(h), cs.append(cr)
        ws.append(torch.randn(out, dim, generator=torch.Generator().manual_seed(e)))
    got = gptaq_targets(torch.stack(ws).cuda(), torch.stack(hs).float().cuda(), torch.stack(cs).float().cuda(),
                        alpha=1.0, damp=0.1, memory_gb=0.0005)  # chunks of one expert
    assert got.is_cuda
    for e in range(e_num):
        want = gptaq_target_ref(ws[e], hs[e], cs[e], 1.0, 0.1)
        torch.testing.assert_close(got[e].cpu().double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_pipeline_on_the_gpu_groups_match_one_group(models, tmp_path):
    """On CUDA (bf16 layers and Hessians, the batched solver, float64 batched targets): groups of 3 match one
    group in the first MoE layer bit for bit, and the down_proj differs from the plain run."""
    src = models("qwen3_moe")
    scheme = {"bits": 3, "group_size": 32}
    plain = checkpoint_tensors(_out(src, _recipe(device="cuda", scheme=scheme), tmp_path / "p"))
    one = checkpoint_tensors(_out(src, _recipe(device="cuda", scheme=scheme, gptaq={"enabled": True}),
                                  tmp_path / "one"))
    three = checkpoint_tensors(_out(src, _recipe(device="cuda", scheme=scheme, gptaq={"enabled": True},
                                                 experts_per_group=3), tmp_path / "three"))
    first = [k for k in one if k.startswith("model.layers.0.")]
    assert all(torch.equal(one[k], three[k]) for k in first)
    changed = {_kind(k) for k in first if not torch.equal(one[k], plain[k])}
    assert changed == {"routed_down", "attention_out"}, changed


def test_linear_inputs_pair_the_passes_like_the_twin():
    """LinearInputs: pass 1's inputs of B (after A) with their row weights, then a pass with A changed: the joint
    accumulator holds the twin's H~ and C of (x = B's input then, x~ = now); a pass that differs is an error."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 10, bias=False), torch.nn.Linear(10, 4, bias=False)
    net = torch.nn.Sequential(a, torch.nn.Tanh(), b)
    zs = [torch.randn(n, 6) for n in (5, 9)]
    weights = iter([torch.rand(5), torch.rand(9)])
    current = {}

    def weight_fn():
        return current["w"]

    inputs = gptaq_pipeline.LinearInputs({"b": b}, {"b": weight_fn})
    with torch.no_grad(), inputs.recording():
        for z in zs:
            current["w"] = next(weights)
            net(z)
    xs = [x.clone() for x, _ in inputs.rows["b"]]
    cs = [w for _, w in inputs.rows["b"]]
    with torch.no_grad():
        a.weight.add_(0.1 * torch.randn_like(a.weight))
    acc = {"b": ops.HessianAccumulator(1, 20, dtype=torch.float64)}
    with torch.no_grad(), inputs.pairing(acc):
        for z in zs:
            net(z)
    with torch.no_grad():
        xts = [torch.tanh(a(z)) for z in zs]
    h, cr = asymmetric_statistics_ref(torch.cat(xs), torch.cat(xts), torch.cat(cs))
    m = float(acc["b"].mass[0])
    torch.testing.assert_close(acc["b"].hessians[0, :10, :10] / m, h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc["b"].hessians[0, 10:, :10] / m, cr, rtol=1e-4, atol=1e-5 * float(cr.abs().max()))
    with torch.no_grad(), pytest.raises(RuntimeError, match="gptaq: b was called more often than in the calibration"):
        with inputs.pairing({"b": ops.HessianAccumulator(1, 20)}):
            for z in zs + zs:
                net(z)
    with torch.no_grad(), pytest.raises(RuntimeError, match="gptaq: b received other rows than in the calibration"):
        with inputs.pairing({"b": ops.HessianAccumulator(1, 20)}):
            net(zs[1])
