"""The step dispatcher's decisions, from host-side state only."""

from __future__ import annotations

from types import SimpleNamespace

from fastcache.dispatch import StepDispatcher, steps_in_call
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


def test_pndm_repeated_first_timestep_shares_the_decision_and_numbering_goes_on():
    scheduler = SimpleNamespace(num_inference_steps=6, config=SimpleNamespace(skip_prk_steps=True), counter=0, ets=[])

    def pndm_step():  # diffusers' step_plms: the second call (counter 1) stores no model output
        if scheduler.counter != 1:
            scheduler.ets.append("output")
        scheduler.counter += 1

    dispatcher = StepDispatcher(UniformSchedule(2))
    # DeepCache's numbering for these 7 calls: 0, 1, 1, 3, 4, 5, 6
    assert decisions(dispatcher, scheduler, 7, after_call=pndm_step) == "RcccRcR"
