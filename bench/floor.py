"""The floor: how fast a U-Net step could be if the card ran only its matrix work at full rate.

`unet_work` counts the multiply-accumulates of one U-Net call (the full U-Net, and the shallow
branch of a DeepCache split) by running the split on the meta device under torch's
`FlopCounterMode`: no weights, no memory, exact shapes from the config. Convolutions and linear
layers are what published figures count (SD 1.5 at 512: ~339 GMACs per image); attention's two
batched matmuls are reported apart. `dense_matmul_rate` measures the card's dense matrix rate
(fp16 on CUDA) with one large GEMM; floor seconds = FLOPs / that rate, and a measured step's
ratio to it says how much room is left.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .timing import TimingStats, repeat

# aten ops FlopCounterMode reports, by what they are in a U-Net.
_CONV_LINEAR = ("convolution", "addmm", "mm")
_ATTENTION = ("bmm", "baddbmm", "_scaled_dot_product")


@dataclass(frozen=True)
class UNetWork:
    """Multiply-accumulates of one U-Net call at one shape (batch as called, CFG included)."""

    batch: int  # U-Net batch: images x 2 with classifier-free guidance
    full_conv_linear_macs: float
    full_attention_macs: float
    shallow_conv_linear_macs: float
    shallow_attention_macs: float

    @property
    def full_macs(self) -> float:
        return self.full_conv_linear_macs + self.full_attention_macs

    @property
    def shallow_macs(self) -> float:
        return self.shallow_conv_linear_macs + self.shallow_attention_macs

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "full_macs": self.full_macs, "shallow_macs": self.shallow_macs}


def _split_counts(counts: dict[Any, int]) -> tuple[float, float]:
    conv_linear = attention = 0.0
    for op, flops in counts.items():
        name = str(op).removeprefix("aten.").split(".")[0]
        if name in _CONV_LINEAR:
            conv_linear += flops / 2
        elif name.startswith(_ATTENTION):
            attention += flops / 2
        else:
            raise ValueError(f"FlopCounterMode reported an op this floor does not classify: {op}")
    return conv_linear, attention


def unet_work(unet_config: dict[str, Any], height: int, width: int, batch: int, text_length: int = 77,
              branch_id: int = 0) -> UNetWork:
    """Count one call of a U-Net built from `unet_config` (nothing is allocated: meta device)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from fastcache.unet_split import UNetSplit

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        factor = 2 ** (len(unet.config.block_out_channels) - 1)
        latent_h, latent_w = height // factor, width // factor
        sample = torch.empty(batch, unet.config.in_channels, latent_h, latent_w)
        timestep = torch.empty(batch)
        context = torch.empty(batch, text_length, unet.config.cross_attention_dim)
        added: dict[str, Any] = {}
        if unet.config.addition_embed_type == "text_time":
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            added = {"text_embeds": torch.empty(batch, pooled), "time_ids": torch.empty(batch, 6)}
        split = UNetSplit(unet, branch_id)
        with FlopCounterMode(display=False) as counter:
            _, kept = split.full(sample, timestep, context, added)
        full = _split_counts(counter.get_flop_counts()["Global"])
        with FlopCounterMode(display=False) as counter:
            split.shallow(sample, timestep, context, added, kept)
        shallow = _split_counts(counter.get_flop_counts()["Global"])
    return UNetWork(batch, full[0], full[1], shallow[0], shallow[1])


@dataclass(frozen=True)
class MatmulRate:
    """Measured dense matrix rate of a device: FLOP/s of one large square GEMM."""

    device: str
    dtype: str
    size: int
    flops_per_s: float
    seconds: TimingStats


def dense_matmul_rate(
    device: torch.device, dtype: torch.dtype, size: int | None = None, runs: int = 10, per_run: int = 10
) -> MatmulRate:
    """Median rate of ``size x size @ size x size`` (8192 on CUDA, 1024 on CPU by default).

    Each timed run does `per_run` GEMMs back to back, so the host sync after a run is noise.
    """
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)

    def gemms() -> None:
        for _ in range(per_run):
            torch.mm(a, b, out=out)

    with torch.no_grad():
        gemms()  # library initialisation and clocks ramping up, untimed
        stats, _ = repeat(gemms, device, runs)
    per_gemm = TimingStats.of([seconds / per_run for seconds in stats.runs])
    return MatmulRate(str(device), str(dtype).removeprefix("torch."), size, 2 * size**3 / per_gemm.median, per_gemm)


def floor_seconds(macs: float, rate: MatmulRate) -> float:
    """Seconds the card needs for `macs` multiply-accumulates at its dense matrix rate."""
    return 2 * macs / rate.flops_per_s


@dataclass
class StepFloor:
    """One method's measured U-Net steps at one shape against the floor of the same work."""

    method: str
    full_or_refresh_s: float | None  # median of full (no caching) or refresh steps
    cached_s: float | None
    full_floor_s: float
    shallow_floor_s: float | None  # for the method's branch; None without caching

    @property
    def full_ratio(self) -> float | None:
        return None if self.full_or_refresh_s is None else self.full_or_refresh_s / self.full_floor_s

    @property
    def cached_ratio(self) -> float | None:
        if self.cached_s is None or self.shallow_floor_s is None:
            return None
        return self.cached_s / self.shallow_floor_s


@dataclass
class ShapeFloor:
    """The floor at one shape: the work counted, the rate measured, and each method against it."""

    rate: MatmulRate
    work_by_branch: dict[int, UNetWork]
    steps: list[StepFloor]


def shape_floor(unet_config: dict[str, Any], height: int, width: int, unet_batch: int, text_length: int,
                rate: MatmulRate, methods: list[Any]) -> ShapeFloor:
    """`methods`: bench MethodResults (their ``steps`` and, for caching methods, ``config``)."""
    branches = sorted({_branch(m.config) for m in methods if m.config is not None} | {0})
    work = {b: unet_work(unet_config, height, width, unet_batch, text_length, b) for b in branches}
    steps = []
    for m in methods:
        branch = _branch(m.config) if m.config is not None else None
        full = m.steps.full or m.steps.refresh
        steps.append(StepFloor(
            method=m.label,
            full_or_refresh_s=full.median if full is not None else None,
            cached_s=m.steps.cached.median if m.steps.cached is not None else None,
            full_floor_s=floor_seconds(work[0].full_macs, rate),
            shallow_floor_s=floor_seconds(work[branch].shallow_macs, rate) if branch is not None else None,
        ))
    return ShapeFloor(rate, work, steps)


def _branch(config: str) -> int:
    """The branch id of a config label such as "I3B0" (or "I3B0G10")."""
    from .methods import CacheConfig

    return CacheConfig.parse(str(config)).branch
