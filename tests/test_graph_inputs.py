"""In-place writes into graph inputs: FreeU rescales the kept features at every cached step.

diffusers' ``apply_freeu`` scales half the channels of the up path's hidden state in place
(``hidden_states[:, :C//2] = hidden_states[:, :C//2] * b``). On a cached step at a branch inside
the two deepest up blocks (SD branches 6-11, SDXL 3-8), that tensor *is* the kept features, so
every cached step scales them once more: in DeepCache's helper (its cached module output), in the
eager split, and therefore in every fastcache runner, which must equal them. A graph replay does
the same; the runs before a capture (warm-ups, the emulated recording) must not, or the first
cached replay reads over-scaled features (0.05-0.75 off in latents before the fix).

Reference: the eager split (compile=False, no graphs), which equals DeepCache 0.1.1 exactly.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest
import torch

from fastcache.recording import Recording
from fastcache.runtime import StepInputs
from fastcache.tiny import tiny_sd_unet, tiny_sdxl_unet
from fastcache.unet_split import UNetSplit

from .helpers import accelerated, deepcache_latents, latents, max_diff

FREEU = dict(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
# Branches whose kept features enter an up block FreeU scales (resolution_idx 0 and 1): SD's
# levels 2 and 3, SDXL's levels 1 and 2 (3 branches per level with layers_per_block=2).
FREEU_BRANCHES = {"sd": range(6, 12), "sdxl": range(3, 9)}


@contextlib.contextmanager
def freeu(pipe: Any) -> Iterator[None]:
    pipe.enable_freeu(**FREEU)
    try:
        yield
    finally:
        pipe.disable_freeu()


@pytest.fixture
def pipes(sd_pipe, sdxl_pipe):
    return {"sd": sd_pipe, "sdxl": sdxl_pipe}


# The first and the last branch FreeU reaches in each U-Net, and one in the middle; 11 is SD's
# deepest (the kept features are the mid block's output).
@pytest.mark.covers("FreeU, feed-forward chunking (changed after accelerate)", "emulated CUDA Graphs")
@pytest.mark.parametrize("kind, branch", [("sd", 6), ("sd", 9), ("sd", 11), ("sdxl", 3), ("sdxl", 8)])
def test_freeu_under_emulated_graphs_equals_eager(pipes, kind, branch):
    pipe = pipes[kind]
    with freeu(pipe):
        with accelerated(pipe, cache_interval=3, cache_branch_id=branch, compile=False):
            eager = latents(pipe)
        with accelerated(pipe, cache_interval=3, cache_branch_id=branch, compile=False, emulate_graphs=True) as handle:
            emulated = latents(pipe)
            assert handle._runner.captures == 2
        reference = deepcache_latents(pipe, 3, branch)
    assert torch.equal(eager, reference), "the eager split must equal DeepCache with FreeU on"
    assert torch.equal(emulated, eager), f"emulated graphs differ from eager by {max_diff(emulated, eager):.3g}"


@pytest.mark.covers("FreeU, feed-forward chunking (changed after accelerate)", "compiled (dynamo, no graph breaks)")
@pytest.mark.parametrize("kind, branch", [("sd", 9), ("sdxl", 5)])
def test_freeu_under_compiled_emulated_graphs_equals_the_compiled_path(pipes, kind, branch):
    """aot_eager functionalises FreeU's write and copies it back into the kept input; replays
    of the compiled split equal its plain calls bit for bit, and both are close to eager."""
    pipe = pipes[kind]
    options = dict(cache_interval=3, cache_branch_id=branch, compile_backend="aot_eager")
    with freeu(pipe):
        with accelerated(pipe, **options):
            compiled = latents(pipe)
        with accelerated(pipe, emulate_graphs=True, **options) as handle:
            emulated = latents(pipe)
            assert handle._runner.captures == 2
        with accelerated(pipe, cache_interval=3, cache_branch_id=branch, compile=False):
            eager = latents(pipe)
    assert torch.equal(emulated, compiled), f"emulated graphs differ from compiled by {max_diff(emulated, compiled):.3g}"
    # aot_eager decomposes some ops; a skipped or doubled FreeU scaling moves these latents by > 0.04.
    assert max_diff(compiled, eager) <= 1e-4 * eager.abs().max().item()


def _step_inputs(split: UNetSplit, kind: str, residuals: bool) -> StepInputs:
    """Random inputs of one U-Net call (batch 1, 16x16 latents), with ControlNet-style residuals
    shaped like the split's skip connections and mid block output when `residuals`."""
    generator = torch.Generator().manual_seed(0)
    unet = split.unet
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    conditions = (
        {"text_embeds": torch.randn(1, 32, generator=generator), "time_ids": torch.randn(1, 6, generator=generator)}
        if kind == "sdxl" else None
    )
    inputs = StepInputs.from_unet_call(sample, 500, context, conditions)
    if residuals:
        emb, context, hidden = split._embed(*inputs.args())
        skips = [hidden]
        deepest = split._down(hidden, emb, context, None, skips, stop=None)
        inputs.added["down_residuals"] = tuple(torch.randn(s.shape, generator=generator) for s in skips)
        inputs.added["mid_residual"] = torch.randn(split._mid(deepest, emb, context, None).shape, generator=generator)
    return inputs


# The shallowest branch, the last one FreeU does not reach, the first it reaches, the last of that
# up block, and the deepest (where the kept features are the mid block's output).
AUDITED_BRANCHES = {"sd": (0, 5, 6, 8, 11), "sdxl": (0, 2, 3, 5, 8)}


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@torch.no_grad()
def test_the_split_writes_into_no_input_but_freeus_kept_features(kind):
    """The audit behind GraphRunner's save-and-restore around capture: of every tensor a graph
    reads that outlives it (static inputs, ControlNet residuals, weights, the kept features), the
    split writes only into the kept features, and only on a shallow run at a branch FreeU
    reaches (except the deepest branch with a mid residual, where the shallow run adds the
    residual to a copy first). The recorder sees every aten op, so nothing else slips by."""
    unet = tiny_sdxl_unet() if kind == "sdxl" else tiny_sd_unet()
    unet.enable_freeu(**FREEU)
    for residuals in (False, True):
        for branch in AUDITED_BRANCHES[kind]:
            split = UNetSplit(unet, branch)
            inputs = _step_inputs(split, kind, residuals)
            full = Recording(lambda: split.full(*inputs.args()))
            kept = full.first_result[1]
            shallow = Recording(lambda: split.shallow(*inputs.args(), kept))
            where = f"branch {branch}, residuals {residuals}"
            assert full.written_inputs == [], where
            writes_kept = branch in FREEU_BRANCHES[kind] and not (residuals and split.keeps_mid_output)
            assert [id(t) for t in shallow.written_inputs] == ([id(kept)] if writes_kept else []), where
