"""Shared fixtures: tiny pipelines built once per session, and the DeepCache reference."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

# Two cores in CI, shared by pytest-xdist's workers (README runs -n 2): keep torch from
# oversubscribing them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))
warnings.filterwarnings("ignore", message=".*torchvision.*")

from fastcache.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa: E402

from .helpers import assert_untouched  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "covers(feature=None, check=None, *, xfail=None, cuda_only=False): the README support-table"
        " cell(s) this test checks; a test covers every feature x every check its marks name"
        " (tools/support_table.py renders them)",
    )
    config.addinivalue_line(
        "markers",
        "cuda: needs a CUDA GPU; added to every test skipped for want of one (bench/gpu_check.py runs -m cuda)",
    )
    config.addinivalue_line(
        "markers", "slow: starts heavy processes (Ray Serve replicas, inductor compiles); CI runs it, -m 'not slow' skips it",
    )


def pytest_collection_modifyitems(config, items):
    """Mark `cuda` every test whose skipif says it needs a CUDA GPU, so that the one-shot GPU check
    selects them all with ``-m cuda`` wherever they live, on a GPU (not skipped) as on a CPU."""
    for item in items:
        if any("CUDA" in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(scope="session")
def sd_pipe():
    return tiny_sd_pipeline()


@pytest.fixture(scope="session")
def sdxl_pipe():
    return tiny_sdxl_pipeline()


@pytest.fixture(params=[pytest.param("sd", marks=pytest.mark.covers("StableDiffusionPipeline")),
                        pytest.param("sdxl", marks=pytest.mark.covers("StableDiffusionXLPipeline"))])
def any_pipe(request, sd_pipe, sdxl_pipe):
    """Each test using it runs on the tiny SD and the tiny SDXL pipeline."""
    return sd_pipe if request.param == "sd" else sdxl_pipe


@pytest.fixture(autouse=True)
def _pipelines_left_clean(request):
    """Every test must leave the shared pipelines exactly as built (a leak would taint the rest)."""
    yield
    for name in ("sd_pipe", "sdxl_pipe"):
        if name in request.fixturenames:
            assert_untouched(request.getfixturevalue(name))
