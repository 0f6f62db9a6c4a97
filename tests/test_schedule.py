"""Refresh schedules against their definitions and DeepCache's own non-uniform sampler."""

from __future__ import annotations

import logging
import math

import pytest

from fastcache.errors import InvalidConfigError
from fastcache.schedule import (
    ExplicitSchedule,
    QuadraticSchedule,
    UniformSchedule,
    deepcache_quadratic_steps,
    make_schedule,
)

from .helpers import deepcache_quad_center


def refreshes(schedule, num_steps):
    return [step for step in range(num_steps) if schedule.is_refresh(step, num_steps)]


def test_uniform_matches_deepcache_interval_seq():
    # DeepCache's pipeline: interval_seq = list(range(0, num_inference_steps, cache_interval))
    for interval in (1, 2, 3, 5, 7):
        assert refreshes(UniformSchedule(interval), 50) == list(range(0, 50, interval))


@pytest.mark.parametrize("num_steps", [10, 16, 20, 25, 30, 50, 100])
@pytest.mark.parametrize("interval", [2, 3, 4, 5])
def test_quadratic_equals_deepcache_sample_from_quad_center(num_steps, interval):
    reference = deepcache_quad_center()
    num_refreshes = math.ceil(num_steps / interval)  # DeepCache: N // interval (+1 on remainder)
    try:
        expected, _ = reference(num_steps, num_refreshes, center=15, pow=1.4)
    except ValueError:  # DeepCache finds no schedule: neither may we (the fallback is tested below)
        with pytest.raises(InvalidConfigError):
            deepcache_quadratic_steps(num_steps, num_refreshes, 15, 1.4)
        return
    expected = sorted(int(step) for step in expected)
    assert deepcache_quadratic_steps(num_steps, num_refreshes, 15, 1.4) == expected
    assert refreshes(QuadraticSchedule(interval, 15, 1.4), num_steps) == expected


def test_quadratic_known_value():
    # DeepCache's README setting (50 steps, interval 5, center 15, pow 1.4), computed by DeepCache 0.1.1.
    assert refreshes(QuadraticSchedule(5), 50) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]


def test_quadratic_falls_back_to_uniform_with_a_warning(caplog):
    reference = deepcache_quad_center()
    with pytest.raises(ValueError):
        reference(30, 15, center=15, pow=1.4)  # DeepCache itself gives up at 30 steps, interval 2
    with caplog.at_level(logging.WARNING, logger="fastcache"):
        assert refreshes(QuadraticSchedule(2, 15, 1.4), 30) == list(range(0, 30, 2))
    assert "uniform schedule" in caplog.text


def test_quadratic_with_interval_one_is_caching_off():
    # DeepCache's pipeline special-cases cache_interval == 1 the same way.
    assert refreshes(QuadraticSchedule(1), 7) == list(range(7))


def test_explicit_schedule_always_refreshes_step_zero():
    schedule = make_schedule([4, 9], cache_interval=3)
    assert isinstance(schedule, ExplicitSchedule)
    assert refreshes(schedule, 12) == [0, 4, 9]


@pytest.mark.parametrize(
    "schedule, interval, message",
    [
        ("uniform", 0, "cache_interval must be an int >= 1"),
        ("uniform", -3, "cache_interval must be an int >= 1"),
        ("uniform", 2.5, "cache_interval must be an int >= 1"),
        ("cosine", 3, "unknown schedule 'cosine'"),
        ([], 3, "non-empty list"),
        ([1, -2], 3, "non-empty list"),
    ],
)
def test_bad_schedules_are_refused(schedule, interval, message):
    with pytest.raises(InvalidConfigError, match=message):
        make_schedule(schedule, interval)


def test_bad_quadratic_parameters_are_refused():
    with pytest.raises(InvalidConfigError, match=r"power must be a finite number in \(1, 10\]"):
        make_schedule("quadratic", 3, center=15, power=1.0)
    with pytest.raises(InvalidConfigError, match="center must be an int >= 0"):
        make_schedule("quadratic", 3, center=-1)


def test_schedules_say_whether_they_ever_cache():
    assert not UniformSchedule(1).caches and UniformSchedule(2).caches
    assert not QuadraticSchedule(1).caches and QuadraticSchedule(3).caches
    assert ExplicitSchedule(frozenset({0, 1})).caches
