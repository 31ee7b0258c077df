"""Which ComfyUI UNet calls may replay a CUDA graph (``comfyui_unet_check``), with transformer_options shaped as
ComfyUI 0.8.0's sampler builds them (``comfy/samplers.py::_calc_cond_batch``)."""

from __future__ import annotations

import uuid

import pytest
import torch

from fpq_plugin.integrations import comfyui_graphs
from fpq_plugin.integrations.comfyui_graphs import comfyui_unet_check


def _plain_options() -> dict:
    return {"cond_or_uncond": [1, 0], "uuids": [uuid.uuid4(), uuid.uuid4()], "sigmas": torch.ones(2),
            "sample_sigmas": torch.linspace(14, 0, 21), "wrappers": {"diffusion_model": {}}, "callbacks": {},
            "patches": {}, "transformer_index": 3, "block": ("input", 1), "original_shape": [2, 4, 64, 64]}


def test_a_plain_sampler_call_may_replay() -> None:
    x, t = torch.zeros(2, 4, 8, 8), torch.ones(2)
    assert comfyui_unet_check((x, t), {"context": x, "control": None, "transformer_options": _plain_options()}) is None
    assert comfyui_unet_check((x, t), {}) is None


@pytest.mark.parametrize("change,reason", [
    (lambda o: o["patches"].update(attn1_patch=[print]), "patches"),
    (lambda o: o.update(patches_replace={"attn2": {("input", 1): print}}), "patches_replace"),
    (lambda o: o["wrappers"]["diffusion_model"].update(freeu=[print]), "wrappers"),
    (lambda o: o.update(optimized_attention_override=print), "attention override"),
])
def test_patches_wrappers_and_overrides_keep_the_call_eager(change, reason) -> None:
    options = _plain_options()
    change(options)
    assert reason in comfyui_unet_check((torch.zeros(1), torch.ones(1)), {"transformer_options": options})


def test_a_controlnet_keeps_the_call_eager_by_keyword_or_position_only_when_switched_off(monkeypatch) -> None:
    control = {"input": [torch.zeros(1)], "middle": [], "output": []}
    monkeypatch.setattr(comfyui_graphs, "GRAPH_CONTROLNET", False)
    assert "ControlNet" in comfyui_unet_check((torch.zeros(1), torch.ones(1)), {"control": control})
    assert "ControlNet" in comfyui_unet_check((torch.zeros(1), torch.ones(1), None, None, control), {})
    monkeypatch.setattr(comfyui_graphs, "GRAPH_CONTROLNET", True)
    assert comfyui_unet_check((torch.zeros(1), torch.ones(1)), {"control": control}) is None
    assert comfyui_unet_check((torch.zeros(1), torch.ones(1), None, None, control), {}) is None


def test_the_controlnet_switch_comes_from_the_environment() -> None:
    assert comfyui_graphs.graph_controlnet_from_env({}), "on by default"
    assert comfyui_graphs.graph_controlnet_from_env({"FPQ_GRAPH_CONTROLNET": "1"})
    for off in ("0", "false", "OFF", " no "):
        assert not comfyui_graphs.graph_controlnet_from_env({"FPQ_GRAPH_CONTROLNET": off})


def test_empty_patch_lists_do_not_count() -> None:
    options = _plain_options()
    options["patches"] = {"attn1_patch": []}
    options["patches_replace"] = {"attn1": {}}
    assert comfyui_unet_check((torch.zeros(1),), {"transformer_options": options}) is None
