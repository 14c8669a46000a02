"""diffusers' training-free caches on our DiT: the small adapter the hooks need, nothing forked.

* :func:`register_block` registers ``StepVideoTransformerBlock`` with diffusers'
  ``TransformerBlockRegistry`` (one tensor out; its hidden-states argument is the first one).
* :func:`prepare_config` checks a cache config against what our model offers: First-Block-Cache,
  MagCache and TaylorSeer work; Pyramid Attention Broadcast and FasterCache hook diffusers'
  ``Attention`` modules (``AttentionModuleMixin``) and our attention modules are not those, so
  they are refused with that reason. TaylorSeer's default module patterns (``...attn``) match no
  name here; ours (``transformer_blocks.N.attn1|attn2``) are filled in.
* :func:`apply_cache` installs a config on a plain ``StepVideoModel`` (the runtime's model) with
  diffusers' own ``apply_*`` functions, and takes it off with ``CacheMixin.disable_cache``.
  Under Ulysses / tensor / CFG parallelism every rank must skip the same steps: MagCache and
  TaylorSeer decide from step counts (the same on every rank); First-Block-Cache decides from
  the first block's output, which differs per rank (token chunk, CFG row), so its head hook is
  replaced by :class:`AgreedFirstBlockHook`, which sums the metric's numerator and denominator
  over the ranks before deciding.
"""
from __future__ import annotations

import dataclasses
import inspect
from contextlib import ExitStack
from typing import Callable, List

import torch
import torch.distributed as dist
from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, HookRegistry, MagCacheConfig,
                             PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig, apply_first_block_cache,
                             apply_mag_cache, apply_taylorseer_cache)
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK, FBCHeadBlockHook
from diffusers.hooks.mag_cache import _MAG_CACHE_LEADER_BLOCK_HOOK
from diffusers.models.cache_utils import CacheMixin

from ..models.blocks import StepVideoTransformerBlock

CONTEXT = "stepvideo"                                        # one state per model call (CFG rows batched)
TAYLORSEER_IDENTIFIERS = [r"transformer_blocks\.\d+\.attn[12]"]


def register_block() -> None:
    """Tell diffusers how to read our block: ``forward(x, context, ...) -> x`` (a tensor).

    The hooks look the hidden states up by the name ``hidden_states``; our argument is named
    ``x``, so the metadata's parameter table maps both names to position 0.
    """
    names = list(inspect.signature(StepVideoTransformerBlock.forward).parameters)[1:]
    indices = {name: i for i, name in enumerate(names)}
    indices["hidden_states"] = 0
    TransformerBlockRegistry.register(StepVideoTransformerBlock, TransformerBlockMetadata(
        return_hidden_states_index=0, return_encoder_hidden_states_index=None,
        hidden_states_argument_name=names[0], _cached_parameter_indices=indices))


def prepare_config(config):
    """Refuse configs whose hook contract our model cannot meet; fill TaylorSeer's patterns."""
    if isinstance(config, (PyramidAttentionBroadcastConfig, FasterCacheConfig)):
        raise ValueError(f"{type(config).__name__} hooks diffusers' Attention modules (AttentionModuleMixin); "
                         "Step-Video's attention modules are not those. Use FirstBlockCacheConfig, "
                         "MagCacheConfig or TaylorSeerCacheConfig")
    if isinstance(config, TaylorSeerCacheConfig) and not config.use_lite_mode and not config.cache_identifiers:
        config = dataclasses.replace(config, cache_identifiers=list(TAYLORSEER_IDENTIFIERS))
    return config


def refresh_hook_registry(model: torch.nn.Module) -> None:
    """diffusers 0.38 caches a model's list of hooked submodules at the first ``cache_context``
    and never rebuilds it; after switching caches (e.g. First-Block-Cache on the blocks, then
    TaylorSeer on the attention modules) the new hooks would get no context. Drop that list."""
    HookRegistry.check_if_exists_or_initialize(model)._child_registries_cache = None


def cache_config(kind: str, value: float):
    """A ``--cache`` spec (see :mod:`stepvideo.perf.cache`) -> the diffusers config."""
    if kind == "fbc":
        return FirstBlockCacheConfig(threshold=float(value))
    if kind == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=int(value), cache_identifiers=list(TAYLORSEER_IDENTIFIERS))
    raise ValueError(f"unknown cache kind {kind!r}")


class AgreedFirstBlockHook(FBCHeadBlockHook):
    """diffusers' First-Block-Cache head hook with the skip decision made over all ranks.

    The metric is diffusers' ``mean|r - r_prev| / mean|r_prev|`` on the first block's residual
    ``r``; here both sums are all-reduced over ``group`` first, so it is the metric of the whole
    (unsplit) batch and sequence and every rank gets the same number; a final MAX all-reduce of
    the decision makes it identical even if float rounding differed.
    """

    def __init__(self, state_manager, threshold: float, group=None):
        super().__init__(state_manager, threshold)
        self.group = group

    @torch.compiler.disable
    def _should_compute_remaining_blocks(self, hidden_states_residual: torch.Tensor) -> bool:
        previous = self.state_manager.get_state().head_block_residual
        if previous is None:
            return True
        sums = torch.stack([(hidden_states_residual - previous).abs().sum(dtype=torch.float32),
                            previous.abs().sum(dtype=torch.float32)]).double()
        dist.all_reduce(sums, group=self.group)
        compute = (sums[0] / sums[1] > self.threshold).double()     # decided on the device, in float64
        dist.all_reduce(compute, op=dist.ReduceOp.MAX, group=self.group)
        return bool(compute.item())                                   # the step's one host read


def _agree_first_block(model: torch.nn.Module, group) -> None:
    """Swap the First-Block-Cache head hook for :class:`AgreedFirstBlockHook` (same state)."""
    registry = HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0])
    stock = registry.get_hook(_FBC_LEADER_BLOCK_HOOK)
    registry.remove_hook(_FBC_LEADER_BLOCK_HOOK, recurse=False)
    registry.register_hook(AgreedFirstBlockHook(stock.state_manager, stock.threshold, group), _FBC_LEADER_BLOCK_HOOK)


class ActiveCache:
    """A cache installed on a model by :func:`apply_cache`; :meth:`remove` takes it off again."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._context = ExitStack()
        self._context.enter_context(CacheMixin.cache_context(model, CONTEXT))

    def remove(self) -> None:
        self._context.close()
        CacheMixin._reset_stateful_cache(self.model)
        CacheMixin.disable_cache(self.model)


def apply_cache(model: torch.nn.Module, config, group=None) -> ActiveCache:
    """Install a diffusers cache config on ``model`` (``StepVideoModel`` or our diffusers model).

    ``group``: the ranks that run this model together (default: the whole world when
    ``torch.distributed`` is initialised); their First-Block-Cache decisions are agreed.
    """
    if getattr(model, "_cache_config", None) is not None:
        raise ValueError(f"a cache is already enabled on this model ({type(model._cache_config).__name__})")
    register_block()
    config = prepare_config(config)
    apply = {FirstBlockCacheConfig: apply_first_block_cache, MagCacheConfig: apply_mag_cache,
             TaylorSeerCacheConfig: apply_taylorseer_cache}[type(config)]
    apply(model, config)
    refresh_hook_registry(model)
    model._cache_config = config                 # what CacheMixin.disable_cache reads
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    if distributed and isinstance(config, FirstBlockCacheConfig):
        _agree_first_block(model, group)
    return ActiveCache(model)


def calibrate_mag_ratios(model: torch.nn.Module, run: Callable[[], object], num_inference_steps: int) -> List[float]:
    """MagCache's per-step magnitude ratios for ``model``: ``run()`` one generation of
    ``num_inference_steps`` steps with diffusers' calibrate mode on (nothing is skipped)."""
    active = apply_cache(model, MagCacheConfig(calibrate=True, num_inference_steps=num_inference_steps))
    try:
        hook = HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0]).get_hook(
            _MAG_CACHE_LEADER_BLOCK_HOOK)
        ratios = hook.state_manager.get_state().calibration_ratios   # the list the run appends to
        run()
    finally:
        active.remove()
    return list(ratios)
