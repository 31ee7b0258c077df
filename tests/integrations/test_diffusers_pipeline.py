"""FPQuantPipeline on a real diffusers pipeline built from configs (tiny UNet, CLIP, tokenizer files, VAE)."""

from __future__ import annotations

import time

import numpy as np
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


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_sd2_and_sdxl_calibrate_hit_the_cache_and_reload_saved(kind, tmp_path) -> None:
    """The SD1.5 tests above, once per other family: SD2.x (v-prediction, linear projections) and SDXL (two text
    encoders, micro-conditioning through ``added_cond_kwargs``), with learned rounding (w4a8 + QUICK)."""
    folder = save_tiny_pipeline(tmp_path / f"tiny-{kind}", kind, seed=0)
    cache = tmp_path / "cache"
    pipe = FPQuantPipeline.from_pretrained(folder, "w4a8", cache_dir=cache, progress=False, **KW)
    assert pipe.fpq_info["cache_hit"] is False and type(pipe).__name__ == type(_float_pipe(folder)).__name__
    assert len(fpq.quantized_layers(pipe.unet)) == len(_linear_and_conv_layers(_float_pipe(folder).unet))
    images = _images(pipe, seed=1)
    float_images = _images(_float_pipe(folder), seed=1)
    assert np.isfinite(images).all() and not np.array_equal(images, float_images)
    again = FPQuantPipeline.from_pretrained(folder, "w4a8", cache_dir=cache, progress=False, **KW)
    assert again.fpq_info["cache_hit"] is True and (_images(again, seed=1) == images).all()
    shared = save_quantized_pipeline(again, tmp_path / "shared")
    loaded = FPQuantPipeline.from_pretrained(shared)
    assert (_images(loaded, seed=1) == images).all()


def _float_pipe(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _linear_and_conv_layers(module: torch.nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


# ---- progress, cancellation, and the quantized UNet inside the rest of diffusers ------------------------------------

# Activation calibration through the pipeline's own sampler, no learned rounding: quick, and these tests are about
# the plumbing around the method, not its quality.
RTN = MethodConfig("quick-rtn", rounding_iters=0, search_rows=256, weight_shrink_factors=(1.0, 0.8),
                   act_shrink_factors=(1.0, 0.8))
RTN_KW = dict(method=RTN, num_prompts=2, num_inference_steps=4, keep_steps=2)


def _cache_files(root):
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) if root.exists() else []


def test_progress_reports_both_phases_and_cancelling_writes_nothing(folder, tmp_path) -> None:
    events: list[tuple[str, int, int, str]] = []

    def cancel_at(phase: str, at: int):
        def progress(p, done, total, detail):
            events.append((p, done, total, detail))
            if p == phase and done == at:
                raise fpq.CancelledError(f"cancelled at {p} {done}")
        return progress

    for phase, at in (("calibrate", 3), ("quantize", 2)):
        events.clear()
        with pytest.raises(fpq.CancelledError):
            FPQuantPipeline.from_pretrained(folder, "w8a8", cache_dir=tmp_path, progress=cancel_at(phase, at),
                                            **RTN_KW)
        assert events[-1][:2] == (phase, at)
        assert _cache_files(tmp_path) == [], "a cancelled build must leave no entry and no temp file"

    events.clear()
    pipe = FPQuantPipeline.from_pretrained(folder, "w8a8", cache_dir=tmp_path, progress=cancel_at("none", 0),
                                           **RTN_KW)
    assert not pipe.fpq_info["cache_hit"] and len(_cache_files(tmp_path)) == 1
    calibrate = [e for e in events if e[0] == "calibrate"]
    quantize = [e for e in events if e[0] == "quantize"]
    assert calibrate[-1][1:3] == (2 * 4, 2 * 4)  # 2 prompts x 4 steps, one UNet call per step (CFG batched)
    assert [e[1] for e in calibrate] == list(range(0, 9))
    assert "a" in calibrate[-1][3]  # the prompt being sampled
    units = quantize[-1][2]
    done = [e[1] for e in quantize]
    # Between completed units the method also reports per searched layer (same count: a heartbeat that lets a
    # long search be cancelled), so counts repeat but never go back, and every unit is reported once complete.
    assert done == sorted(done) and set(range(1, units + 1)) <= set(done) and done[-1] == units and units > 5
    assert all(e[3] for e in quantize)  # each update names its unit


def test_rich_bars_render_to_a_console(folder, tmp_path) -> None:
    import io

    from rich.console import Console

    from fpq_plugin.integrations.progress import RichPhaseBars

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    with RichPhaseBars(console) as bars:
        FPQuantPipeline.from_pretrained(folder, "w8a8", cache_dir=tmp_path, progress=bars, **RTN_KW)
    text = out.getvalue()
    assert "calibration sampling (UNet calls)" in text and "search + rounding (units)" in text
    assert "8/8" in text


@pytest.fixture(scope="module")
def quantized_cache(folder, tmp_path_factory):
    """A cache holding the w8a8 tiny UNet; each test loads its own pipeline from it (a hit: about a second)."""
    root = tmp_path_factory.mktemp("cache")
    FPQuantPipeline.from_pretrained(folder, "w8a8", cache_dir=root, progress=False, **RTN_KW)
    return root


def _load(folder, cache):
    pipe = FPQuantPipeline.from_pretrained(folder, "w8a8", cache_dir=cache, progress=False, **RTN_KW)
    assert pipe.fpq_info["cache_hit"] and len(fpq.quantized_layers(pipe.unet)) > 0
    return pipe


def _gen(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_scheduler_swap_cfg_and_batches(folder, quantized_cache) -> None:
    from diffusers import EulerDiscreteScheduler

    pipe = _load(folder, quantized_cache)
    kw = dict(num_inference_steps=4, output_type="np")
    ddim = pipe(["a blue circle"], generator=_gen(0), **kw).images
    no_cfg = pipe(["a blue circle"], generator=_gen(0), guidance_scale=1.0, **kw).images  # UNet batch 1
    assert np.isfinite(ddim).all() and np.isfinite(no_cfg).all() and not np.array_equal(ddim, no_cfg)

    # A batch of two prompts, two images each: per-image generators give each image its own latents.
    batch = pipe(["a blue circle", "a red square"], num_images_per_prompt=2, generator=_gen(0, 1, 2, 3), **kw).images
    assert batch.shape == (4, 32, 32, 3) and np.isfinite(batch).all()
    # The same first image as alone, up to float reassociation in batched kernels (amplified by FP8 rounding).
    assert np.abs(batch[0] - ddim[0]).mean() < 0.02

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    euler = pipe(["a blue circle"], generator=_gen(0), **kw).images
    assert np.isfinite(euler).all() and not np.array_equal(euler, ddim)


def test_model_cpu_offload_gives_the_same_images(folder, quantized_cache) -> None:
    pytest.importorskip("accelerate")
    pipe = _load(folder, quantized_cache)
    reference = pipe(["a blue circle"], num_inference_steps=4, generator=_gen(0), output_type="np").images
    # On a CPU-only machine the "execution device" is the CPU too: this checks that accelerate's offload hooks
    # wrap the quantized UNet (buffers-only layers) and move it without breaking it, not a real GPU round trip.
    pipe.enable_model_cpu_offload(device="cpu")
    assert getattr(pipe.unet, "_hf_hook", None) is not None
    offloaded = pipe(["a blue circle"], num_inference_steps=4, generator=_gen(0), output_type="np").images
    assert np.array_equal(offloaded, reference)


def _sqnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    noise = (test - reference).pow(2).mean().clamp_min(1e-30)
    return float(10 * torch.log10(reference.pow(2).mean() / noise))


def _float_unet(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()


def test_torch_compile_runs_the_quantized_unet(folder, quantized_cache) -> None:
    import shutil

    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        pytest.skip("torch.compile's CPU backend (inductor) needs a C++ compiler; none is on PATH")
    from fpq_plugin.models.unet_configs import example_unet_inputs

    pipe = _load(folder, quantized_cache)
    inputs = example_unet_inputs(pipe.unet, batch=2)  # one CFG-sized call
    torch._dynamo.reset()
    with torch.no_grad():
        eager = pipe.unet(**inputs).sample
        compiled = torch.compile(pipe.unet)(**inputs).sample
    # Inductor reorders float ops and the FP8 activation rounding turns some ulp differences into one-step
    # differences, so compiled and eager are close, not identical. On this random tiny UNet W8A8 itself is only
    # ~18 dB from float, and compiled-vs-eager measured 23.6 dB: the bar is that compiling adds far less error
    # than quantizing did, i.e. compiled stays as close to the float UNet as eager is.
    assert _sqnr(eager, compiled) > 20, _sqnr(eager, compiled)
    float_unet = _float_unet(folder)
    with torch.no_grad():
        fp = float_unet(**inputs).sample
    assert _sqnr(fp, compiled) > _sqnr(fp, eager) - 1.0, (_sqnr(fp, compiled), _sqnr(fp, eager))
