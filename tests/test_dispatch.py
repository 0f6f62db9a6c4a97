"""The step dispatcher's decisions, from host-side state only."""

from __future__ import annotations

from types import SimpleNamespace

from fastcache.dispatch import StepDispatcher, steps_in_call, timestep_position
from fastcache.schedule import QuadraticSchedule, UniformSchedule


class SecondOrderScheduler:
    """Mimics Heun/DPM2: the U-Net is called twice per step; `state_in_first_order` says which."""

    def __init__(self, num_inference_steps):
        self.num_inference_steps = num_inference_steps
        self.state_in_first_order = True

    def step(self):
        self.state_in_first_order = not self.state_in_first_order


def decisions(dispatcher, scheduler, calls, key="k", after_call=None):
    out = []
    for _ in range(calls):
        out.append(dispatcher.next_call(scheduler, key))
        if after_call:
            after_call()
    return "".join("R" if r else "c" for r in out)


def test_uniform_first_order():
    dispatcher = StepDispatcher(UniformSchedule(3))
    scheduler = SimpleNamespace(num_inference_steps=8)
    assert decisions(dispatcher, scheduler, 8) == "RccRccRc"


def test_rearm_makes_the_next_call_a_refresh():
    dispatcher = StepDispatcher(UniformSchedule(3))
    scheduler = SimpleNamespace(num_inference_steps=8)
    assert decisions(dispatcher, scheduler, 2) == "Rc"
    dispatcher.rearm()
    assert decisions(dispatcher, scheduler, 4) == "RccR"


def test_second_order_steps_count_as_the_user_sees_them():
    # Heun with 4 steps calls the U-Net 7 times: steps 0,0,1,1,2,2,3 (measured on diffusers 0.42).
    scheduler = SecondOrderScheduler(4)
    dispatcher = StepDispatcher(UniformSchedule(2))
    assert decisions(dispatcher, scheduler, 7, after_call=scheduler.step) == "RRccRRc"
    assert dispatcher.step == 3


def test_shape_change_inside_a_call_refreshes():
    dispatcher = StepDispatcher(UniformSchedule(4))
    scheduler = SimpleNamespace(num_inference_steps=8)
    out = [dispatcher.next_call(scheduler, key) for key in ("a", "a", "b", "b", "a")]
    assert out == [True, False, True, False, True]


def test_forced_schedule_overrides_until_cleared():
    dispatcher = StepDispatcher(UniformSchedule(1))
    scheduler = SimpleNamespace(num_inference_steps=3)
    dispatcher.force(UniformSchedule(10))
    assert decisions(dispatcher, scheduler, 3) == "Rcc"
    dispatcher.force(None)
    dispatcher.rearm()
    assert decisions(dispatcher, scheduler, 3) == "RRR"


def test_quadratic_uses_the_number_of_steps_of_the_call():
    dispatcher = StepDispatcher(QuadraticSchedule(5))
    scheduler = SimpleNamespace(num_inference_steps=50)
    pattern = decisions(dispatcher, scheduler, 50)
    assert [i for i, c in enumerate(pattern) if c == "R"] == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]


def test_steps_in_call_accounts_for_img2img_begin_index():
    assert steps_in_call(SimpleNamespace(num_inference_steps=50)) == 50
    assert steps_in_call(SimpleNamespace(num_inference_steps=50, begin_index=20, order=1)) == 30
    assert steps_in_call(SimpleNamespace(num_inference_steps=10, begin_index=8, order=2)) == 6
    assert steps_in_call(SimpleNamespace()) is None


def test_few_steps_warn_once(caplog):
    import logging

    dispatcher = StepDispatcher(UniformSchedule(3))
    with caplog.at_level(logging.WARNING, logger="fastcache"):
        for _ in range(2):
            dispatcher.rearm()
            assert decisions(dispatcher, SimpleNamespace(num_inference_steps=4), 4) == "RccR"
    assert caplog.text.count("only 4 denoising steps") == 1
    caplog.clear()
    quiet = StepDispatcher(UniformSchedule(1))  # caching off: nothing to warn about
    with caplog.at_level(logging.WARNING, logger="fastcache"):
        decisions(quiet, SimpleNamespace(num_inference_steps=4), 4)
        decisions(StepDispatcher(UniformSchedule(3)), SimpleNamespace(num_inference_steps=25), 3)
    assert caplog.text == ""


def _plms_scheduler(num_steps: int) -> SimpleNamespace:
    """A PNDM scheduler in PLMS mode as diffusers builds it: timesteps [t0, t1, t1, t2, ...], kept
    both as a tensor and on the host (``plms_timesteps``)."""
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(skip_prk_steps=True)
    scheduler.set_timesteps(num_steps)
    return scheduler


def _pattern(dispatcher, scheduler, timesteps) -> str:
    """Decisions for a loop over `timesteps` (a slice of scheduler.timesteps, as a pipeline does)."""
    out = []
    for t in timesteps:
        dispatcher.locate(scheduler, t)
        out.append(dispatcher.next_call(scheduler, "k"))
    return "".join("R" if r else "c" for r in out)


def test_pndm_repeated_first_timestep_shares_the_decision_and_numbering_goes_on():
    scheduler = _plms_scheduler(6)
    dispatcher = StepDispatcher(UniformSchedule(2))
    # DeepCache's numbering for these 7 calls: 0, 1, 1, 3, 4, 5, 6
    assert _pattern(dispatcher, scheduler, scheduler.timesteps) == "RcccRcR"


def test_pndm_img2img_numbers_steps_as_deepcache_from_the_first_position():
    """An img2img call starts at position t_start of [t0, t1, t1, t2, ...]; DeepCache numbers its
    calls index(t) - index(first t): t_start 1: 0,0,2,3,...; 2: 0,2,3,...; 3 or more: 0,1,2,..."""
    scheduler = _plms_scheduler(10)
    expected = {
        0: [0, 1, 1, 3, 4, 5, 6, 7, 8, 9, 10],
        1: [0, 0, 2, 3, 4, 5, 6, 7, 8, 9],
        2: [0, 2, 3, 4, 5, 6, 7, 8, 9],
        3: [0, 1, 2, 3, 4, 5, 6, 7],
        7: [0, 1, 2, 3],
    }
    for t_start, numbers in expected.items():
        for interval in (2, 3):
            dispatcher = StepDispatcher(UniformSchedule(interval))
            pattern = _pattern(dispatcher, scheduler, scheduler.timesteps[t_start:])
            assert pattern == "".join("R" if n % interval == 0 else "c" for n in numbers), (t_start, interval)
    dispatcher = StepDispatcher(UniformSchedule(3))  # the case: 10 steps, strength 0.8
    assert _pattern(dispatcher, scheduler, scheduler.timesteps[2:]) == "RcRccRccR"


def test_timestep_position_reads_metadata_only():
    scheduler = _plms_scheduler(10)
    timesteps = scheduler.timesteps
    assert [timestep_position(scheduler, t) for t in timesteps[2:5]] == [2, 3, 4]
    assert timestep_position(scheduler, timesteps[3].clone()) is None  # a copy: position unknown
    assert timestep_position(scheduler, int(timesteps[3])) is None
    assert timestep_position(SimpleNamespace(), timesteps[3]) is None


def test_pndm_without_a_known_position_numbers_as_text_to_image():
    """A custom loop passing Python numbers: the first call is taken as position 0 (as before)."""
    scheduler = _plms_scheduler(6)
    dispatcher = StepDispatcher(UniformSchedule(2))
    assert _pattern(dispatcher, scheduler, [int(t) for t in scheduler.timesteps]) == "RcccRcR"
    dispatcher.rearm()  # the position of one call does not leak into the next
    assert _pattern(dispatcher, scheduler, scheduler.timesteps[2:]) == "RRcRc"  # numbers 0,2,3,4,5
    dispatcher.rearm()
    assert _pattern(dispatcher, scheduler, [int(t) for t in scheduler.timesteps]) == "RcccRcR"


def test_locate_reads_only_the_first_call_of_a_pipeline_call():
    scheduler = _plms_scheduler(6)
    dispatcher = StepDispatcher(UniformSchedule(2))
    dispatcher.locate(scheduler, scheduler.timesteps[2])
    dispatcher.next_call(scheduler, "k")
    dispatcher.locate(scheduler, scheduler.timesteps[0])  # ignored: not the first call
    assert dispatcher.peek(scheduler, "k") is True  # numbers 0, 2: the second call refreshes
