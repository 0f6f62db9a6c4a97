"""recording.py: the CPU stand-in for CUDA Graph capture has a CUDA Graph's replay semantics.

Reference: the function run eagerly, and what a CUDA Graph would do (tensors read by reference,
Python values baked in at capture).
"""

from __future__ import annotations

import torch

from fastcache.recording import Recording
from fastcache.tiny import tiny_sd_unet
from fastcache.unet_call import StepInputs
from fastcache.unet_split import UNetSplit


def test_replays_read_tensors_by_reference_and_python_values_as_captured():
    weight = torch.nn.Parameter(torch.randn(4, 4))
    static = torch.randn(3, 4)
    scale = torch.ones(2)
    setting = {"factor": 2.0}

    def function():
        hidden = torch.relu(static @ weight.t())  # a view (t) and intermediates
        hidden.add_(1.0)  # in place on an intermediate
        parts = torch.chunk(hidden * scale[1] * setting["factor"], 2, dim=1)  # several outputs
        return torch.cat(parts[::-1], dim=1), static  # a made tensor and a tensor from before

    with torch.no_grad():
        recording = Recording(function)
        assert torch.equal(recording.first_result[0], function()[0])
        static.copy_(torch.randn(3, 4))
        scale.fill_(3.0)
        weight.mul_(0.5)
        replayed, passed_through = recording()
        assert torch.equal(replayed, function()[0]), "new values in tensors read at capture must be seen"
        assert passed_through is static
        setting["factor"] = 5.0
        assert torch.allclose(recording()[0] * 2.5, function()[0]), "a Python value is baked in at capture"
        old = weight
        weight = torch.nn.Parameter(torch.randn(4, 4))  # new storage: the recording keeps the old one
        assert torch.equal(recording()[0], torch.cat(torch.chunk(
            (torch.relu(static @ old.t()) + 1.0) * 3.0 * 2.0, 2, dim=1)[::-1], dim=1))


def test_a_recorded_unet_split_replays_bit_for_bit():
    unet = tiny_sd_unet()
    split = UNetSplit(unet, 0)
    inputs = StepInputs.from_unet_call(torch.randn(2, 4, 16, 16), torch.tensor(500), torch.randn(2, 77, 32))
    with torch.no_grad():
        recording = Recording(lambda: split.full(*inputs.args()))
        inputs.sample.copy_(torch.randn(2, 4, 16, 16))
        inputs.timestep.fill_(300.0)
        for replayed, eager in zip(recording(), split.full(*inputs.args())):
            assert torch.equal(replayed, eager)
