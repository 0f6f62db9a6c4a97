"""fastcache.DeepCacheSDHelper passes the checks its original, DeepCache's helper, passes."""

from __future__ import annotations

import pytest
import torch

from fastcache import DeepCacheSDHelper
from fastcache.errors import AlreadyAcceleratedError, InvalidConfigError

from .helpers import assert_untouched, deepcache_latents, latents, max_diff


@pytest.mark.covers("fastcache.DeepCacheSDHelper (drop-in)", "= DeepCache")
@pytest.mark.parametrize("interval, branch", [(2, 0), (3, 1), (5, 5), (3, 8)])
def test_same_latents_as_deepcache(any_pipe, interval, branch):
    expected = deepcache_latents(any_pipe, interval, branch)
    helper = DeepCacheSDHelper(pipe=any_pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch, compile=False)
    helper.enable()
    try:
        actual = latents(any_pipe)
    finally:
        helper.disable()
    assert max_diff(actual, expected) <= 1e-5
    assert_untouched(any_pipe)


@pytest.mark.covers("fastcache.DeepCacheSDHelper (drop-in)", "caching off = plain")
def test_defaults_are_deepcache_defaults_caching_off(sd_pipe):
    """DeepCache's set_params defaults to cache_interval=1: the output equals the plain pipeline."""
    expected = latents(sd_pipe)
    helper = DeepCacheSDHelper()
    helper.set_params(compile=False)
    helper.enable(sd_pipe)  # the pipeline may also be given to enable()
    try:
        assert max_diff(latents(sd_pipe), expected) <= 1e-6
    finally:
        helper.disable()


def test_enable_disable_cycle_and_errors(sd_pipe):
    before = latents(sd_pipe, steps=4)
    helper = DeepCacheSDHelper(pipe=sd_pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0, compile=False)
    helper.enable()
    try:
        with pytest.raises(AlreadyAcceleratedError, match="already enabled"):
            helper.enable()
    finally:
        helper.disable()
    helper.disable()  # a second disable is a no-op
    assert torch.equal(latents(sd_pipe, steps=4), before)
    with pytest.raises(InvalidConfigError, match="skip_mode"):
        helper.set_params(skip_mode="random")
    with pytest.raises(InvalidConfigError, match="cache_interval"):
        helper.set_params(cache_interval=0)
    with pytest.raises(InvalidConfigError, match="needs a pipeline"):
        DeepCacheSDHelper().enable()
    with pytest.raises(InvalidConfigError, match=r"valid ids are 0\.\.11"):
        helper.set_params(cache_branch_id=12, compile=False)
        helper.enable()
    assert_untouched(sd_pipe)
