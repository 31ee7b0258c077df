from __future__ import annotations

import pytest
import torch

from fpq_plugin.method import capture_pipeline_inputs, record_unet_inputs, spread_steps
from fpq_plugin.models.tiny_pipeline import build_tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("sd15")


def test_spread_steps_cover_the_schedule() -> None:
    assert spread_steps(10, 4) == {0, 3, 6, 9}
    assert spread_steps(3, 8) == {0, 1, 2}
    assert spread_steps(20, 1) == {10}


def test_captured_inputs_reproduce_the_pipelines_own_unet_calls(pipe) -> None:
    outputs = []
    handle = pipe.unet.register_forward_hook(lambda m, a, out: outputs.append(out[0].detach().clone()))
    try:
        with record_unet_inputs(pipe.unet) as calls:
            pipe(["a red cube on a table"], num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                 output_type="latent")
    finally:
        handle.remove()
    assert len(calls) == 5 == len(outputs)
    assert [c.step for c in calls] == list(range(5))
    first = calls[0]
    assert first.args[0].shape[0] == 2  # classifier-free guidance: uncond and cond halves together
    assert "encoder_hidden_states" in first.kwargs
    timesteps = [int(c.args[1]) for c in calls]
    assert timesteps == sorted(timesteps, reverse=True)  # spread over the noise schedule
    with torch.no_grad():
        for call, out in zip(calls, outputs):
            assert torch.equal(pipe.unet(*call.args, **call.kwargs)[0], out)
    assert not pipe.unet._forward_pre_hooks


def test_keep_steps_and_hook_removed_on_error(pipe) -> None:
    calls = capture_pipeline_inputs(pipe, ["a", "b"], num_inference_steps=6, keep_steps=3)
    assert [c.step for c in calls] == [0, 2, 5] * 2  # spread_steps(6, 3); round() halves to even
    with pytest.raises(RuntimeError, match="boom"):
        with record_unet_inputs(pipe.unet):
            raise RuntimeError("boom")
    assert not pipe.unet._forward_pre_hooks


def test_memory_bound(pipe) -> None:
    with record_unet_inputs(pipe.unet, max_bytes=1) as calls:
        pipe(["x"], num_inference_steps=4, output_type="latent")
    assert len(calls) == 1  # stops recording once the budget is used
