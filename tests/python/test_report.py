"""Calibration statistics in the quantize report, and ``moequant report``: text, the self-contained HTML page, the
CLI's errors, and the page in a real headless browser (Debian's chromium; skipped without it)."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from moequant import ops, pipeline
from moequant.cli import main
from moequant.eval.compare import COMPARE_FILE, compare
from moequant.eval.report_html import HTML_FILE, load_run, render_html, render_text
from moequant.pipeline.jobs import jobs_stats_values, matrix_stats, matrix_stats_values
from moequant.pipeline.report import QuantizationReport, module_kind
from moequant.recipe import CalibrationConfig, FallbackConfig, QuantScheme, Recipe
from testdata import tiny_qwen3_checkpoint

REPO = Path(__file__).resolve().parents[2]
CALIB = REPO / "examples" / "data" / "wikitext2_calib.txt"
TEXT = REPO / "examples" / "data" / "wikitext2_heldout.txt"
CHROMIUM = ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome")


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moequant: error: "), err
    return lines[0]


def _recipe(**fallback) -> Recipe:
    return Recipe(scheme=QuantScheme(group_size=32, symmetric=True), fallback=FallbackConfig(**fallback),
                  calibration=CalibrationConfig(text_files=[str(CALIB)], num_samples=4, seq_len=64, batch_size=2))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A quantized tiny model with its report and a compare result: a saved run."""
    root = tmp_path_factory.mktemp("rep")
    tiny = tiny_qwen3_checkpoint(root / "model")
    out = root / "q"
    pipeline.quantize(tiny, _recipe(), output_dir=out, progress=False)
    compare(tiny, out, TEXT, seq_len=32, max_windows=4, batch_size=4, progress=False).save(out / COMPARE_FILE)
    return out


def test_matrix_stats_are_the_definitions(gen, make_hessian):
    w = torch.randn(24, 32, generator=gen)
    h = make_hessian(32, 200, gen, torch.float32) / 200
    qt = ops.quantize_rtn(w, bits=3, group_size=16)
    s = matrix_stats(w, h, qt, torch.bfloat16)
    d = w.double() - qt.dequantized.to(torch.bfloat16).double()
    hd = h.double()
    assert s["hessian_trace"] == pytest.approx(float(hd.trace()), rel=1e-5)
    assert s["effective_rank"] == pytest.approx(float(hd.trace() ** 2 / (hd * hd).sum()), rel=1e-5)
    assert s["error"] == pytest.approx(float(torch.trace(d @ hd @ d.t())), rel=1e-4)
    assert s["energy"] == pytest.approx(float(torch.trace(w.double() @ hd @ w.double().t())), rel=1e-5)
    assert s["rel_error"] == pytest.approx(s["error"] / s["energy"])
    assert 1 <= s["effective_rank"] <= 32
    assert matrix_stats(w, None, qt, torch.bfloat16) == {}
    assert set(matrix_stats(w, h, qt, torch.bfloat16, errors=False)) == {"hessian_trace", "effective_rank"}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matrix_stats_on_gpu_within_a_stated_budget(gen, make_hessian, dtype):
    """On a GPU error and energy come from one bf16 tensor-core product (fp32 accumulation): held to 1% of the
    float64 definitions (a report statistic); trace and effective rank stay float32."""
    w = torch.randn(96, 256, generator=gen).to(dtype)
    h = make_hessian(256, 2000, gen, torch.float32) / 2000
    qt = ops.quantize_rtn(w.float(), bits=3, group_size=64)
    s = matrix_stats(w.cuda(), h.cuda(), qt, dtype)
    d = w.double() - qt.dequantized.to(dtype).double()
    hd = h.double()
    assert s["error"] == pytest.approx(float(torch.trace(d @ hd @ d.t())), rel=1e-2)
    assert s["energy"] == pytest.approx(float(torch.trace(w.double() @ hd @ w.double().t())), rel=1e-2)
    assert s["effective_rank"] == pytest.approx(float(hd.trace() ** 2 / (hd * hd).sum()), rel=1e-4)


def _stats_items(gen, make_hessian, device):
    """Matrices of two shapes (one without a Hessian between them), as a layer's experts and a Linear."""
    items = []
    for k, (rows, cols) in enumerate([(48, 128)] * 5 + [(64, 96)] * 3):
        w = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
        h = make_hessian(cols, 500, gen, torch.float32) / 500 if k != 2 else None
        items.append((w.to(device), h.to(device) if h is not None else None,
                      ops.quantize_rtn(w.float(), bits=4, group_size=32)))
    return items


def test_jobs_stats_values_on_the_cpu_are_the_one_matrix_values(gen, make_hessian):
    items = _stats_items(gen, make_hessian, "cpu")
    got = jobs_stats_values(items, torch.bfloat16)
    for (w, h, qt), v in zip(items, got):
        want = matrix_stats_values(w, h, qt, torch.bfloat16)
        assert (v is None) == (h is None) and (v is None or torch.equal(v, want))


@pytest.mark.gpu
@pytest.mark.parametrize("batch_bytes", [1, 2**20, 2**30])  # one matrix a product, a few, all of a shape
def test_jobs_stats_values_batched_on_gpu_are_the_one_matrix_values(gen, make_hessian, batch_bytes):
    """The batched products (same bf16 operands, float32 accumulation) agree with matrix_stats_values matrix by
    matrix to float32 summation order, in the jobs' order, None without a Hessian, with or without errors."""
    items = _stats_items(gen, make_hessian, "cuda")
    for errors in (True, False):
        got = jobs_stats_values(items, torch.bfloat16, errors, batch_bytes=batch_bytes)
        for (w, h, qt), v in zip(items, got):
            want = matrix_stats_values(w, h, qt, torch.bfloat16, errors)
            assert (v is None) == (h is None)
            if v is not None:
                assert v.shape == want.shape == (4 if errors else 2,)
                torch.testing.assert_close(v, want, rtol=1e-4, atol=0)  # summation order only


def test_report_records_calibration_statistics(run_dir):
    rep = QuantizationReport.load(run_dir / "moequant_report.json")
    for layer in rep.layers:
        for m in layer.modules:
            assert m.hessian_trace > 0 and 1 <= m.effective_rank <= 64
            assert 0 < m.rel_error < 0.5 and m.error == m.loss  # the reported loss is the stored weights' error
        kinds = layer.error_by_kind()
        assert set(kinds) == {"attention", "routed"} and kinds["routed"][2] == 8  # 4 experts: gate+up, down
        assert sorted(layer.expert_errors()) == [0, 1, 2, 3]
    assert "relative error attention" in rep.summary()


def test_fallback_experts_report_their_fallback_hessian(tmp_path):
    tiny = tiny_qwen3_checkpoint(tmp_path / "m")
    rep = pipeline.quantize(tiny, _recipe(min_tokens=10**6, policy="identity"), progress=False)
    routed = [m for layer in rep.layers for m in layer.modules if module_kind(m.name) == "routed"]
    assert routed and all(m.fallback == "identity" and m.hessian_trace == 64 for m in routed)
    assert all(m.effective_rank == pytest.approx(64) for m in routed)
    assert all(f for x in rep.layers for _, _, f in x.expert_errors().values())


def test_module_kinds():
    assert module_kind("model.layers.0.self_attn.q_proj") == "attention"
    assert module_kind("model.layers.0.mlp.experts.12.gate_proj+up") == "routed"
    assert module_kind("model.layers.3.block_sparse_moe.experts.0.w2") == "routed"
    assert module_kind("model.layers.0.mlp.shared_expert.down_proj") == "shared"
    assert module_kind("model.layers.0.mlp.down_proj") == "dense"


def test_old_report_without_statistics_renders(run_dir, tmp_path, mpl):
    d = json.loads((run_dir / "moequant_report.json").read_text())
    for layer in d["layers"]:
        for m in layer["modules"]:
            for k in ("hessian_trace", "effective_rank", "error", "energy", "rel_error"):
                m.pop(k)
    (tmp_path / "moequant_report.json").write_text(json.dumps(d))
    run = load_run(tmp_path)
    assert run.compare is None and "no compare result" in render_text(run)
    assert "<img" in render_html(run)  # the utilization heat map still has its data


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib", reason="the HTML report's figures need matplotlib (scripts/setup.sh "
                               "installs it)")


def test_without_matplotlib_the_cli_says_how_to_get_it(capsys, run_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(run_dir), "-q"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "pip install 'moequant[report]'" in line and "--no-html" in line
    assert main(["report", str(run_dir), "--no-html", "-q"]) == 0


def _images(page: str) -> list:
    return re.findall(r"<img [^>]*src='([^']*)'", page)


def test_html_is_self_contained(run_dir, mpl):
    page = render_html(load_run(run_dir))
    srcs = _images(page)
    assert len(srcs) == 6  # utilization, layer errors, expert errors, KL histogram, routing drift, load change
    for s in srcs:
        assert s.startswith("data:image/png;base64,")
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for bad in ("http://", "https://", "<script", "<link", "file:", "url("):
        assert bad not in page
    assert "Experts that lose most" in page and "top-1 agreement" in page


def test_cli_report_prints_and_writes_the_page(capsys, run_dir, tmp_path, mpl):
    page = tmp_path / "r.html"
    assert main(["report", str(run_dir), "--html", str(page), "-q"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "KL(base || quant)" in out and "tokens per expert" in out and "relative error" in out
    assert page.read_text().startswith("<!DOCTYPE html>") and len(_images(page.read_text())) == 6
    assert main(["report", str(run_dir), "--no-html", "-q"]) == 0 and not (run_dir / HTML_FILE).exists()


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "compare_missing", "html_dir"])
def test_cli_report_user_errors_exit_2(capsys, run_dir, tmp_path, case):
    d = tmp_path / "run"
    if case != "missing":
        d.mkdir()
    if case == "corrupt":
        (d / "moequant_report.json").write_text("{not json")
    args = {"missing": [str(d)], "empty": [str(d)], "corrupt": [str(d)],
            "compare_missing": [str(run_dir), "--compare", str(tmp_path / "c.json")],
            "html_dir": [str(run_dir), "--html", str(tmp_path / "no" / "r.html")]}[case]
    match = {"missing": "is not a directory", "empty": "holds neither", "corrupt": "not a moequant report",
             "compare_missing": "--compare", "html_dir": "--html"}[case]
    assert main(["report", *args, "-q"]) == 2
    assert match in _one_error_line(capsys.readouterr().err)


def _chromium() -> str:
    for name in CHROMIUM:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no headless Chromium on PATH (apt-get install chromium; scripts/setup.sh installs it)")


def _browser(exe: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
           "--no-first-run", "--disable-dev-shm-usage", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_page_in_a_headless_browser(run_dir, tmp_path, mpl):
    """The page in Debian's chromium: every figure decodes (a probe script counts the images the browser rendered)
    and the screenshot is a page, not a blank one. MOEQUANT_SCREENSHOT_DIR keeps the screenshot."""
    exe = _chromium()
    from PIL import Image

    page = tmp_path / "report.html"
    html = render_html(load_run(run_dir))
    page.write_text(html)
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", "<script>window.onload=()=>{const i=[...document.images];"
                                  "document.title='IMAGES '+i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'"
                                  "+i.length;};</script></body>"))
    dom = _browser(exe, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    assert "<title>IMAGES 6/6</title>" in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "screenshot.png"
    r = _browser(exe, "--window-size=1200,4200", f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), r.stderr[-2000:]
    img = Image.open(shot).convert("L")
    assert img.size == (1200, 4200)
    hist = img.histogram()
    dark = sum(hist[:128]) / (img.size[0] * img.size[1])
    assert 0.005 < dark < 0.5  # text, tables and figures on a white page
    colours = Image.open(shot).convert("RGB").resize((120, 420)).getcolors(1 << 16)
    assert len(colours) > 50  # the figures' colour maps, not only black on white
    keep = os.environ.get("MOEQUANT_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, Path(keep) / "report_screenshot.png")


def test_log_axes_within_a_decade_label_several_ticks():
    """A routing-drift panel spanning 0.06-0.16 showed one labelled tick (0.1) with 1-2-5 steps."""
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moequant.eval.figures import _plain_log

    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [0.06, 0.1, 0.16])
    ax.set_yscale("log")
    _plain_log(ax)
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    shown = [t for t, v in zip(ax.get_yticklabels(), ax.get_yticks()) if lo <= v <= hi and t.get_text()]
    plt.close(fig)
    assert len(shown) >= 3, [t.get_text() for t in shown]
