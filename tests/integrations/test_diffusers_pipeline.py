"""FPQuantPipeline on a real diffusers pipeline built from configs (tiny UNet, CLIP, tokenizer files, VAE)."""

from __future__ import annotations

import time

import pytest
import torch

import fpq_plugin as fpq
from fpq_plugin.cache import QuantCache
from fpq_plugin.integrations.diffusers_pipeline import FPQuantPipeline, save_quantized_pipeline
from fpq_plugin.method import MethodConfig
from fpq_plugin.models.tiny_pipeline import save_tiny_pipeline

QUICK = MethodConfig("quick-test", rounding_iters=20, search_rows=256, weight_shrink_factors=(1.0, 0.8))
KW = dict(method=QUICK, num_prompts=2, num_inference_steps=4, keep_steps=2)


def _images(pipe, seed: int = 0):
    return pipe(["a blue circle"], num_inference_steps=4, generator=torch.Generator().manual_seed(seed),
                output_type="np").images


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-sd15", "sd15", seed=0)


def test_first_call_calibrates_second_hits_cache(folder, tmp_path) -> None:
    start = time.perf_counter()
    pipe = FPQuantPipeline.from_pretrained(folder, "w8a8", cache_dir=tmp_path, **KW)
    first = time.perf_counter() - start
    assert pipe.fpq_info["cache_hit"] is False
    assert len(fpq.quantized_layers(pipe.unet)) > 0
    images = _images(pipe)
    start = time.perf_counter()
    again = FPQuantPipeline.from_pretrained(folder, "w8a8", cache_dir=tmp_path, **KW)
    second = time.perf_counter() - start
    assert again.fpq_info["cache_hit"] is True
    assert again.fpq_info["cache_key"] == pipe.fpq_info["cache_key"]
    assert second < first
    assert (_images(again) == images).all()


def test_corrupt_entry_is_rebuilt_with_a_warning(folder, tmp_path, caplog) -> None:
    pipe = FPQuantPipeline.from_pretrained(folder, "w8a16", cache_dir=tmp_path, **KW)
    entry = QuantCache(tmp_path).path_for(pipe.fpq_info["cache_key"])
    data = entry.read_bytes()
    entry.write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING"):
        rebuilt = FPQuantPipeline.from_pretrained(folder, "w8a16", cache_dir=tmp_path, **KW)
    assert rebuilt.fpq_info["cache_hit"] is False
    assert any(str(entry.name) in r.getMessage() or "truncated" in r.getMessage() for r in caplog.records)


def test_saved_quantized_pipeline_reloads_with_identical_images(folder, tmp_path) -> None:
    pipe = FPQuantPipeline.from_pretrained(folder, "w4a8", use_cache=False, **KW)
    images = _images(pipe, seed=3)
    out = save_quantized_pipeline(pipe, tmp_path / "shared")
    assert not (out / "unet" / "diffusion_pytorch_model.safetensors").exists()  # no float UNet weights shipped
    loaded = FPQuantPipeline.from_pretrained(out)
    assert loaded.fpq_info["loaded_from"] == str(out)
    assert (_images(loaded, seed=3) == images).all()
