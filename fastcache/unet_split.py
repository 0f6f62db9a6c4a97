"""How a diffusers ``UNet2DConditionModel`` splits into a full and a shallow function.

This is the one place that knows U-Net structure. DeepCache numbers the skip branches of a U-Net
with ``layers_per_block`` layers per level as ``id = block * (layers_per_block + 1) + layer``:
``block`` is the level counted from the shallow end and ``layer`` the position inside it (slot
``layers_per_block`` being the level's downsampler). For branch (block, layer):

* the *full* function is the whole U-Net; it also returns ``kept``, the features entering the up
  layer that mirrors (block, layer), before they are concatenated with their skip connection;
* the *shallow* function runs conv_in, the down layers before (block, layer), then the up path from
  (block, layer) onwards with ``kept`` in place of everything deeper, and conv_out. The deep path
  does not run at all: exactly the layers DeepCache's helper recomputes on a cached step.

Both call the U-Net's own sub-modules in diffusers' order, so ``full`` equals ``unet.forward``
bit for bit when run eagerly. Neither knows about compilation, graphs or scheduling.

TGATE (tgate.py) adds ``full_tgate`` and ``shallow_tgate``: the same functions, where each
transformer block's self- and cross-attention output is computed, computed and returned for later
(a *store*, whole or as the mean of the guided halves), or taken from the given caches (a
*reuse*), as a static tuple of actions says. Those run the transformer blocks' own steps here
(`_transformer_tgate`; layer-norm blocks as SD 1.x/2.x and SDXL have, checked by `tgate_support`),
calling each attention module as diffusers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from .errors import InvalidConfigError, UnsupportedPipelineError
from .tgate import REUSE, STORE, STORE_MEAN
from .unet_call import IP_ADAPTER_PROJECTION

# A TGATE run's context inside a split function: (actions, caches read, outputs stored).
Tgate = tuple[tuple[str, str, str], Mapping[str, Tensor], dict[str, Tensor]]


@dataclass(frozen=True)
class BranchPoint:
    """One DeepCache skip branch: a U-Net level and a layer inside it."""

    branch_id: int
    block: int
    layer: int


@dataclass(frozen=True)
class UNetLayout:
    """The facts about a U-Net that branch numbering depends on."""

    num_levels: int
    layers_per_block: int

    @property
    def num_branches(self) -> int:
        return self.num_levels * (self.layers_per_block + 1)

    def branch(self, branch_id: int) -> BranchPoint:
        if isinstance(branch_id, bool) or not isinstance(branch_id, int):
            raise InvalidConfigError(f"cache_branch_id must be an int, got {branch_id!r}")
        if not 0 <= branch_id < self.num_branches:
            raise InvalidConfigError(
                f"cache_branch_id={branch_id} is out of range for this U-Net: valid ids are "
                f"0..{self.num_branches - 1} ({self.num_levels} levels x {self.layers_per_block + 1} "
                "layers; 0 is the shallowest and fastest)"
            )
        per_level = self.layers_per_block + 1
        return BranchPoint(branch_id, branch_id // per_level, branch_id % per_level)


def _diffusers_blocks() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    from diffusers.models.unets.unet_2d_blocks import (
        CrossAttnDownBlock2D,
        CrossAttnUpBlock2D,
        DownBlock2D,
        UNetMidBlock2D,
        UNetMidBlock2DCrossAttn,
        UpBlock2D,
    )

    return (
        (CrossAttnDownBlock2D, DownBlock2D),
        (UNetMidBlock2DCrossAttn, UNetMidBlock2D),
        (CrossAttnUpBlock2D, UpBlock2D),
    )


def unet_layout(unet: Any) -> UNetLayout:
    """Check that `unet` is a U-Net this module can split, and describe it.

    Raises UnsupportedPipelineError naming the first thing that is not supported.
    """
    from diffusers import UNet2DConditionModel

    if isinstance(unet, torch.nn.Module) and isinstance(getattr(unet, "_orig_mod", None), UNet2DConditionModel):
        raise UnsupportedPipelineError(
            "this pipeline's unet is already wrapped by torch.compile; fastcache compiles the U-Net "
            "itself (its two graphs): give it the plain module, pipe.unet = pipe.unet._orig_mod"
        )
    if not isinstance(unet, UNet2DConditionModel):
        raise UnsupportedPipelineError(
            f"fastcache splits diffusers' UNet2DConditionModel; this pipeline's unet is "
            f"{type(unet).__name__}"
        )
    down_types, mid_types, up_types = _diffusers_blocks()
    problems = []
    for kind, blocks, allowed in (("down", unet.down_blocks, down_types), ("up", unet.up_blocks, up_types)):
        for index, block in enumerate(blocks):
            if type(block) not in allowed:
                names = ", ".join(t.__name__ for t in allowed)
                problems.append(f"{kind} block {index} is {type(block).__name__} (supported: {names})")
    if unet.mid_block is not None and type(unet.mid_block) not in mid_types:
        problems.append(f"mid block is {type(unet.mid_block).__name__}")
    config = unet.config
    if unet.class_embedding is not None:
        problems.append(f"class embeddings (class_embed_type={config.class_embed_type!r})")
    if config.addition_embed_type not in (None, "text_time"):
        problems.append(f"addition_embed_type={config.addition_embed_type!r} (supported: None, 'text_time')")
    if unet.encoder_hid_proj is not None and config.encoder_hid_dim_type != IP_ADAPTER_PROJECTION:
        problems.append(
            f"encoder_hid_proj with encoder_hid_dim_type={config.encoder_hid_dim_type!r} (supported: none, "
            f"or {IP_ADAPTER_PROJECTION!r} from load_ip_adapter)"
        )
    if problems:
        raise UnsupportedPipelineError("this U-Net cannot be split by fastcache: " + "; ".join(problems))

    per_level = {len(block.resnets) for block in unet.down_blocks}
    per_up_level = {len(block.resnets) for block in unet.up_blocks}
    has_downsampler = [block.downsamplers is not None for block in unet.down_blocks]
    if (
        len(per_level) != 1
        or per_up_level != {next(iter(per_level)) + 1}
        or len(unet.down_blocks) != len(unet.up_blocks)
        or has_downsampler != [True] * (len(unet.down_blocks) - 1) + [False]
    ):
        raise UnsupportedPipelineError(
            "fastcache needs a symmetric U-Net: the same layers_per_block in every down block, one "
            "more in every up block, and a downsampler after every level but the deepest "
            f"(down resnets {sorted(per_level)}, up resnets {sorted(per_up_level)}, "
            f"downsamplers {has_downsampler})"
        )
    return UNetLayout(num_levels=len(unet.down_blocks), layers_per_block=next(iter(per_level)))


def tgate_support(unet: Any) -> None:
    """Raise UnsupportedPipelineError unless every transformer block of `unet` is one that
    `UNetSplit._transformer_tgate` runs exactly (SD 1.x/2.x and SDXL U-Nets are)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    problems = []
    transformers = [t for block in (*unet.down_blocks, unet.mid_block, *unet.up_blocks) if block is not None
                    for t in (getattr(block, "attentions", None) or ())]
    for transformer in transformers:
        if type(transformer) is not Transformer2DModel or not transformer.is_input_continuous:
            problems.append(f"{type(transformer).__name__} (supported: Transformer2DModel on continuous input)")
            continue
        for block in transformer.transformer_blocks:
            if type(block) is not BasicTransformerBlock:
                problems.append(f"transformer block {type(block).__name__}")
            elif (block.norm_type != "layer_norm" or block.pos_embed is not None or block.only_cross_attention
                  or block.attn2 is None or hasattr(block, "fuser")):
                problems.append(f"a transformer block with norm_type={block.norm_type!r}, positional embedding, "
                                "cross-attention only, no cross-attention or GLIGEN")
            elif any(attn.residual_connection or attn.rescale_output_factor != 1.0 for attn in (block.attn1, block.attn2)):
                problems.append("attention with a residual connection or an output rescale")
    if problems:
        raise UnsupportedPipelineError(
            "gate_step (TGATE) is not supported for this U-Net: " + "; ".join(sorted(set(problems)))
            + " (supported: SD 1.x/2.x and SDXL U-Nets)"
        )


class UNetSplit:
    """A U-Net divided at one skip branch into `full` and `shallow` (see the module docstring).

    Both functions read the U-Net's weights live (nothing is copied), take the timestep as a
    ``(batch,)`` tensor, and take the added conditions as a mapping with keys from
    ``ADDED_CONDITIONS`` (empty for SD 1.x/2.x).
    """

    def __init__(self, unet: Any, branch_id: int) -> None:
        self.layout = unet_layout(unet)
        self.point = self.layout.branch(branch_id)
        self.unet = unet

    # -- the two functions ------------------------------------------------------------------------
    def full(
        self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, added: Mapping[str, Any]
    ) -> tuple[Tensor, Tensor]:
        """The whole U-Net; returns (noise prediction, kept features for `shallow`)."""
        return self._full(sample, timestep, encoder_hidden_states, added, None)

    def shallow(
        self,
        sample: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        added: Mapping[str, Any],
        kept: Tensor,
    ) -> Tensor:
        """Only the shallow branch, with `kept` (from `full` at an earlier step) for the deep path."""
        return self._shallow(sample, timestep, encoder_hidden_states, added, kept, None)

    def full_tgate(
        self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, added: Mapping[str, Any],
        actions: tuple[str, str, str], caches: Mapping[str, Tensor],
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """`full` with TGATE's attention `actions` (tgate.TgateStep.actions): reads `caches`
        (names from `tgate_reads`), returns (noise, kept, the outputs it stored by name)."""
        stored: dict[str, Tensor] = {}
        noise, kept = self._full(sample, timestep, encoder_hidden_states, added, (actions, caches, stored))
        return noise, kept, stored

    def shallow_tgate(
        self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, added: Mapping[str, Any],
        kept: Tensor, actions: tuple[str, str, str], caches: Mapping[str, Tensor],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """`shallow` with TGATE's attention `actions`; returns (noise, the outputs it stored)."""
        stored: dict[str, Tensor] = {}
        noise = self._shallow(sample, timestep, encoder_hidden_states, added, kept, (actions, caches, stored))
        return noise, stored

    def tgate_reads(self, refresh: bool, actions: tuple[str, str, str]) -> tuple[str, ...]:
        """The cache names a TGATE function with `actions` reads (full: `refresh`)."""
        ca, sa_shallow, sa_deep = actions
        names = []
        for name, shallow in self.attention_blocks():
            if not (shallow or refresh):
                continue
            if ca == REUSE:
                names.append("ca:" + name)
            if (sa_shallow if shallow else sa_deep) == REUSE:
                names.append("sa:" + name)
        return tuple(sorted(names))

    def attention_blocks(self) -> list[tuple[str, bool]]:
        """(name, in the shallow branch) of every transformer block, as the TGATE caches name them."""
        unet, point = self.unet, self.point
        blocks = []
        for level, block in enumerate(unet.down_blocks):
            for layer, transformer in enumerate(getattr(block, "attentions", None) or ()):
                shallow = (level, layer) < (point.block, point.layer)
                blocks += [(f"down.{level}.{layer}.{k}", shallow) for k in range(len(transformer.transformer_blocks))]
        for index, transformer in enumerate(getattr(unet.mid_block, "attentions", None) or ()):
            blocks += [(f"mid.{index}.{k}", False) for k in range(len(transformer.transformer_blocks))]
        num_levels = len(unet.up_blocks)
        for index, block in enumerate(unet.up_blocks):
            level = num_levels - 1 - index
            num_layers = len(block.resnets)
            for position, transformer in enumerate(getattr(block, "attentions", None) or ()):
                shallow = (level, num_layers - 1 - position) <= (point.block, point.layer)
                blocks += [(f"up.{level}.{position}.{k}", shallow) for k in range(len(transformer.transformer_blocks))]
        return blocks

    def _full(
        self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, added: Mapping[str, Any],
        tg: Tgate | None,
    ) -> tuple[Tensor, Tensor]:
        emb, context, hidden = self._embed(sample, timestep, encoder_hidden_states, added)
        attention_kwargs = self._attention_kwargs(added)
        skips = [hidden]
        hidden = self._down(hidden, emb, context, attention_kwargs, skips, stop=None, tg=tg)
        skips = self._add_residuals(skips, added)
        mid = self._mid(hidden, emb, context, attention_kwargs, tg)
        hidden = mid + added["mid_residual"] if "mid_residual" in added else mid
        hidden, kept = self._up(hidden, emb, context, attention_kwargs, skips, sample.shape, start=None, tg=tg)
        if self.keeps_mid_output:  # kept before the residual: a cached step adds its own (see below)
            kept = mid
        return self._out(hidden), kept

    def _shallow(
        self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, added: Mapping[str, Any],
        kept: Tensor, tg: Tgate | None,
    ) -> Tensor:
        emb, context, hidden = self._embed(sample, timestep, encoder_hidden_states, added)
        attention_kwargs = self._attention_kwargs(added)
        skips = [hidden]
        self._down(hidden, emb, context, attention_kwargs, skips, stop=self.point, tg=tg)
        skips = self._add_residuals(skips, added)
        if self.keeps_mid_output and "mid_residual" in added:
            kept = kept + added["mid_residual"]
        hidden, _ = self._up(kept, emb, context, attention_kwargs, skips, sample.shape, start=self.point, tg=tg)
        return self._out(hidden)

    @property
    def keeps_mid_output(self) -> bool:
        """The deepest branch keeps the mid block's output.

        There, a ControlNet's mid residual is added after the cache: DeepCache caches the mid block's
        output and the U-Net adds the current step's residual to it, so a cached step sees a fresh
        mid residual. For every other branch the residual sits inside the cached features.
        """
        return (self.point.block, self.point.layer) == (self.layout.num_levels - 1, self.layout.layers_per_block)

    # -- pieces, in UNet2DConditionModel.forward's order ------------------------------------------
    def _embed(
        self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, added: Mapping[str, Any]
    ) -> tuple[Tensor, Tensor, Tensor]:
        unet = self.unet
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), added.get("timestep_cond"))
        aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
        if aug_emb is not None:
            emb = emb + aug_emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        if "image_embeds" in added:  # diffusers' image projection wants the per-adapter list
            added = {**added, "image_embeds": list(added["image_embeds"])}
        context = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
        return emb, context, unet.conv_in(sample)

    @staticmethod
    def _attention_kwargs(added: Mapping[str, Any]) -> dict[str, Any] | None:
        """The U-Net's ``cross_attention_kwargs`` for its attention processors, as its forward
        passes them on (LoRA's scale removed): IP-Adapter masks, as the list the processors want."""
        masks = added.get("ip_adapter_masks")
        return None if masks is None else {"ip_adapter_masks": list(masks)}

    def _attend(
        self, attention: Any, hidden: Tensor, context: Tensor, attention_kwargs: dict[str, Any] | None,
        tg: Tgate | None = None, name: str = "", shallow: bool = False,
    ) -> Tensor:
        if tg is not None:
            return self._transformer_tgate(attention, hidden, context, attention_kwargs, tg, name, shallow)
        return attention(
            hidden,
            encoder_hidden_states=context,
            cross_attention_kwargs=attention_kwargs,
            attention_mask=None,
            encoder_attention_mask=None,
            return_dict=False,
        )[0]

    def _down(
        self, hidden: Tensor, emb: Tensor, context: Tensor, attention_kwargs: dict[str, Any] | None,
        skips: list[Tensor], stop: BranchPoint | None, tg: Tgate | None = None,
    ) -> Tensor:
        """Down path; appends every skip tensor. With `stop`, ends just before layer (block, layer)."""
        for level, block in enumerate(self.unet.down_blocks):
            attentions = getattr(block, "attentions", None)
            for layer, resnet in enumerate(block.resnets):
                if stop is not None and (level, layer) == (stop.block, stop.layer):
                    return hidden
                hidden = resnet(hidden, emb)
                if attentions is not None:
                    shallow = (level, layer) < (self.point.block, self.point.layer)
                    hidden = self._attend(attentions[layer], hidden, context, attention_kwargs, tg,
                                          f"down.{level}.{layer}", shallow)
                skips.append(hidden)
            if stop is not None and level == stop.block:  # stop.layer is the downsampler's slot
                return hidden
            if block.downsamplers is not None:
                for downsampler in block.downsamplers:
                    hidden = downsampler(hidden)
                skips.append(hidden)
        return hidden

    @staticmethod
    def _add_residuals(skips: list[Tensor], added: Mapping[str, Any]) -> list[Tensor]:
        """ControlNet: its residuals are added to the skip connections (the live prefix when shallow)."""
        residuals = added.get("down_residuals")
        if residuals is None:
            return skips
        return [skip + residual for skip, residual in zip(skips, residuals)]

    def _mid(
        self, hidden: Tensor, emb: Tensor, context: Tensor, attention_kwargs: dict[str, Any] | None,
        tg: Tgate | None = None,
    ) -> Tensor:
        mid = self.unet.mid_block
        if mid is None:
            return hidden
        if tg is not None and getattr(mid, "has_cross_attention", False):
            # UNetMidBlock2DCrossAttn.forward's steps, with TGATE's attention.
            hidden = mid.resnets[0](hidden, emb)
            for index, (attention, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
                hidden = self._attend(attention, hidden, context, attention_kwargs, tg, f"mid.{index}", False)
                hidden = resnet(hidden, emb)
            return hidden
        if getattr(mid, "has_cross_attention", False):
            return mid(
                hidden, emb, encoder_hidden_states=context, attention_mask=None,
                cross_attention_kwargs=attention_kwargs, encoder_attention_mask=None,
            )
        return mid(hidden, emb)

    def _up(
        self,
        hidden: Tensor,
        emb: Tensor,
        context: Tensor,
        attention_kwargs: dict[str, Any] | None,
        skips: list[Tensor],
        sample_shape: torch.Size,
        start: BranchPoint | None,
        tg: Tgate | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Up path, consuming `skips` from the end.

        Without `start` it runs everything and also returns the features entering up layer
        (block, layer) of this split's branch; with `start` it begins at that layer, `hidden`
        being those features.
        """
        from diffusers.utils.torch_utils import apply_freeu

        unet = self.unet
        point = self.point
        factor = 2**unet.num_upsamplers
        forward_upsample_size = any(size % factor != 0 for size in sample_shape[-2:])
        num_levels = len(unet.up_blocks)
        kept = None
        for index, block in enumerate(unet.up_blocks):
            level = num_levels - 1 - index
            if start is not None and level > start.block:
                continue
            attentions = getattr(block, "attentions", None)
            freeu = all(getattr(block, name, None) for name in ("s1", "s2", "b1", "b2"))
            num_layers = len(block.resnets)
            for position, resnet in enumerate(block.resnets):
                layer = num_layers - 1 - position
                if start is not None and level == start.block and layer > start.layer:
                    continue
                if start is None and (level, layer) == (point.block, point.layer):
                    kept = hidden
                skip = skips.pop()
                if freeu:
                    hidden, skip = apply_freeu(
                        block.resolution_idx, hidden, skip, s1=block.s1, s2=block.s2, b1=block.b1, b2=block.b2
                    )
                hidden = resnet(torch.cat([hidden, skip], dim=1), emb)
                if attentions is not None:
                    shallow = (level, layer) <= (point.block, point.layer)
                    hidden = self._attend(attentions[position], hidden, context, attention_kwargs, tg,
                                          f"up.{level}.{position}", shallow)
            if block.upsamplers is not None:
                upsample_size = skips[-1].shape[2:] if (index < num_levels - 1 and forward_upsample_size) else None
                for upsampler in block.upsamplers:
                    hidden = upsampler(hidden, upsample_size)
        return hidden, kept

    def _transformer_tgate(
        self, transformer: Any, hidden: Tensor, context: Tensor, attention_kwargs: dict[str, Any] | None,
        tg: Tgate, name: str, shallow: bool,
    ) -> Tensor:
        """Transformer2DModel.forward (continuous input) and BasicTransformerBlock.forward
        (layer norm) step by step, each attention output computed, stored or reused as `tg` says."""
        (ca, sa_shallow, sa_deep), caches, stored = tg
        sa = sa_shallow if shallow else sa_deep
        batch, _, height, width = hidden.shape
        residual = hidden
        hidden, inner_dim = transformer._operate_on_continuous_inputs(hidden)
        kwargs = dict(attention_kwargs) if attention_kwargs else {}
        for k, block in enumerate(transformer.transformer_blocks):
            key = f"{name}.{k}"
            out = self._attention_tgate(block.attn1, block.norm1(hidden), None, kwargs, sa, "sa:" + key, caches, stored)
            hidden = out + hidden
            if hidden.ndim == 4:
                hidden = hidden.squeeze(1)
            out = self._attention_tgate(block.attn2, block.norm2(hidden), context, kwargs, ca, "ca:" + key, caches, stored)
            hidden = out + hidden
            normed = block.norm3(hidden)
            if block._chunk_size is not None:
                from diffusers.models.attention import _chunked_feed_forward

                ff_output = _chunked_feed_forward(block.ff, normed, block._chunk_dim, block._chunk_size)
            else:
                ff_output = block.ff(normed)
            hidden = ff_output + hidden
            if hidden.ndim == 4:
                hidden = hidden.squeeze(1)
        return transformer._get_output_for_continuous_inputs(
            hidden_states=hidden, residual=residual, batch_size=batch, height=height, width=width, inner_dim=inner_dim,
        )

    @staticmethod
    def _attention_tgate(
        attention: Any, hidden: Tensor, context: Tensor | None, kwargs: dict[str, Any], action: str, key: str,
        caches: Mapping[str, Tensor], stored: dict[str, Tensor],
    ) -> Tensor:
        if action == REUSE:
            return caches[key]
        out = attention(hidden, encoder_hidden_states=context, attention_mask=None, **kwargs)
        if action == STORE:
            stored[key] = out
        elif action == STORE_MEAN:  # the package's keep_shape=False: (uncond + text) / 2
            uncond, text = out.chunk(2)
            stored[key] = (uncond + text) / 2
        return out

    def _out(self, hidden: Tensor) -> Tensor:
        unet = self.unet
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)
