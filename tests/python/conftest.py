"""Shared fixtures of the Python tests. Markers ``gpu`` and ``slow`` are declared in pyproject.toml."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # makes `import tolerances` work from any cwd


def pytest_collection_modifyitems(config, items):
    """Skips tests marked ``gpu`` when no CUDA device is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_dir() -> Path:
    """``../shared`` relative to the repository root (read-only data); skips when it is absent."""
    path = (REPO_ROOT / ".." / "shared").resolve()
    if not path.is_dir():
        pytest.skip(f"shared data directory not found at {path} (expected ../shared next to the repository)")
    return path


@pytest.fixture
def shared_tiny_model(shared_dir) -> Path:
    """The trained tiny Qwen3-MoE ``../shared/models/qwen3moe-tiny``; skips when ../shared or the model's weights
    are absent."""
    path = shared_dir / "models" / "qwen3moe-tiny"
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"trained tiny model not found at {path} (no model.safetensors)")
    return path


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed: every test draws its own reproducible data."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def make_hessian():
    """Factory ``(d, n, gen, dtype=float64) -> X^T X`` of n samples with correlated features of mixed scales."""

    def make(d: int, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        mix = torch.randn(d, d, generator=gen) * 0.5 + torch.eye(d) * 2.0
        x = torch.randn(n, d, generator=gen) @ mix
        x = x * torch.exp(torch.randn(d, generator=gen))  # features of different scales, as in activations
        return (x.double().t() @ x.double()).to(dtype)

    return make
