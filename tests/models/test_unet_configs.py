"""Tests of fpq_plugin.models.unet_configs: real architectures (on meta) and tiny ones (real forward)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fpq_plugin.errors import RecipeError
from fpq_plugin.models.unet_configs import UNET_CONFIGS, build_unet, example_unet_inputs, unet_config

# Parameter counts of the published checkpoints: matching them proves the config literals are the real ones.
REAL_PARAM_COUNTS = {
    "sd15": 859_520_964,
    "sd21": 865_910_724,
    "sdxl": 2_567_463_684,
}


def _num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(REAL_PARAM_COUNTS))
def test_real_configs_match_published_parameter_counts(name: str) -> None:
    unet = build_unet(name, meta=True)
    assert _num_params(unet) == REAL_PARAM_COUNTS[name]
    # meta=True must allocate nothing, buffers included.
    assert all(t.device.type == "meta" for t in [*unet.parameters(), *unet.buffers()])


def test_meta_build_honours_dtype() -> None:
    unet = build_unet("sdxl", meta=True, dtype=torch.float16)
    assert {p.dtype for p in unet.parameters()} == {torch.float16}


def test_unet_config_returns_independent_copy() -> None:
    config = unet_config("sd15")
    config["block_out_channels"].append(1)
    assert UNET_CONFIGS["sd15"]["block_out_channels"] == [320, 640, 1280, 1280]


def test_unknown_config_raises_recipe_error_listing_names() -> None:
    with pytest.raises(RecipeError) as info:
        unet_config("sd3")
    assert isinstance(info.value, ValueError)
    for name in UNET_CONFIGS:
        assert repr(name) in str(info.value)
    with pytest.raises(RecipeError):
        build_unet("nope", meta=True)


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
def test_tiny_forward(name: str) -> None:
    unet = build_unet(name)
    kwargs = example_unet_inputs(unet, batch=2)
    assert kwargs["encoder_hidden_states"].shape == (2, 8, unet.config.cross_attention_dim)
    assert ("added_cond_kwargs" in kwargs) == (name == "tiny-xl")
    with torch.no_grad():
        out = unet(**kwargs).sample
    assert out.shape == kwargs["sample"].shape == (2, 4, 16, 16)
    assert torch.isfinite(out).all()


def test_tiny_forward_non_square_bf16() -> None:
    unet = build_unet("tiny-xl", dtype=torch.bfloat16)
    kwargs = example_unet_inputs(unet, batch=1, height=8, width=16)
    assert kwargs["sample"].dtype == torch.bfloat16
    with torch.no_grad():
        out = unet(**kwargs).sample
    assert out.shape == (1, 4, 8, 16)
    assert torch.isfinite(out.float()).all()


def test_build_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_unet("tiny", seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    b = build_unet("tiny", seed=7)
    c = build_unet("tiny", seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_example_inputs_for_real_sdxl_shapes() -> None:
    unet = build_unet("sdxl", meta=True)
    kwargs = example_unet_inputs(unet, batch=3, height=96, width=128)
    assert kwargs["sample"].shape == (3, 4, 96, 128)
    assert kwargs["timestep"].shape == (3,)
    assert kwargs["encoder_hidden_states"].shape == (3, 77, 2048)
    added = kwargs["added_cond_kwargs"]
    assert added["text_embeds"].shape == (3, 1280)
    assert added["time_ids"].shape == (3, 6)


def test_example_inputs_default_size_and_determinism() -> None:
    unet = build_unet("sd15", meta=True)
    kwargs = example_unet_inputs(unet)
    assert kwargs["sample"].shape == (2, 4, 64, 64)
    assert kwargs["encoder_hidden_states"].shape == (2, 77, 768)
    tiny = build_unet("tiny")
    a, b = example_unet_inputs(tiny, seed=3), example_unet_inputs(tiny, seed=3)
    assert torch.equal(a["sample"], b["sample"]) and torch.equal(a["timestep"], b["timestep"])


def test_import_does_not_import_diffusers() -> None:
    code = (
        "import sys, fpq_plugin.models.unet_configs, fpq_plugin.models.tiny_pipeline; "
        "assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules"
    )
    # A fresh interpreter: this one has long imported diffusers through other tests.
    repo_root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo_root)
