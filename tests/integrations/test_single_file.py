"""Single-file checkpoints: original-layout .safetensors files of the tiny SD1.5 and SDXL pipelines, loaded offline
with a local config folder, quantized, and compared with the folder-loaded pipeline."""

from __future__ import annotations

import shutil

import pytest
import torch

from fpq_plugin.cli import main
from fpq_plugin.errors import CheckpointError
from fpq_plugin.integrations.diffusers_pipeline import FPQuantPipeline
from fpq_plugin.integrations.single_file import SingleFileConfigError, load_single_file_pipeline
from fpq_plugin.method import MethodConfig
from fpq_plugin.models.tiny_pipeline import save_tiny_pipeline
from integrations.sd_single_file import to_original_layout

# Activation calibration through the pipeline's own sampler, no learned rounding: the point here is the loading.
RTN = MethodConfig("quick-rtn", rounding_iters=0, search_rows=256, weight_shrink_factors=(1.0, 0.8),
                   act_shrink_factors=(1.0, 0.8))
KW = dict(method=RTN, num_prompts=1, num_inference_steps=4, keep_steps=2, progress=False)


def _images(pipe, seed: int = 0):
    return pipe(["a blue circle", "a red square"], num_inference_steps=4,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


def _single_file_set(root, kind: str):
    """(pipeline folder, single file, config folder without any weights) of the tiny ``kind`` pipeline."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    folder = save_tiny_pipeline(root / f"tiny-{kind}", kind, seed=0)
    single = root / f"tiny-{kind}.safetensors"
    save_file(to_original_layout(DiffusionPipeline.from_pretrained(str(folder))), str(single))
    config = root / f"configs-{kind}"
    shutil.copytree(folder, config)
    for weights in config.rglob("*.safetensors"):
        weights.unlink()  # the weights must come from the single file
    return folder, single, config


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _single_file_set(tmp_path_factory.mktemp("single"), "sd15")


def _assert_same_components(reference, loaded, names) -> None:
    assert type(loaded) is type(reference)
    for name in names:
        a, b = getattr(reference, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name


def test_original_layout_round_trips_through_diffusers_converters(files) -> None:
    from diffusers import DiffusionPipeline
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    folder, _, _ = files
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    original = to_original_layout(pipe)
    assert "model.diffusion_model.input_blocks.0.0.weight" in original  # the layout from_single_file detects
    for module, converted in ((pipe.unet, convert_ldm_unet_checkpoint(original, dict(pipe.unet.config))),
                              (pipe.vae, convert_ldm_vae_checkpoint(original, dict(pipe.vae.config)))):
        state = module.state_dict()
        assert set(converted) == set(state)
        assert all(torch.equal(converted[k], state[k]) for k in state)


def test_single_file_loads_offline_with_a_config_folder(files) -> None:
    from diffusers import DiffusionPipeline

    folder, single, config = files
    loaded = load_single_file_pipeline(single, config=config)
    _assert_same_components(DiffusionPipeline.from_pretrained(str(folder)), loaded, ("unet", "vae", "text_encoder"))


def test_quantized_single_file_matches_the_folder_pipeline(files, tmp_path) -> None:
    folder, single, config = files
    from_folder = FPQuantPipeline.from_pretrained(folder, "w8a8", cache_dir=tmp_path / "a", **KW)
    from_file = FPQuantPipeline.from_pretrained(single, "w8a8", config=config, cache_dir=tmp_path / "b", **KW)
    assert not from_folder.fpq_info["cache_hit"] and not from_file.fpq_info["cache_hit"]  # both calibrated
    assert from_file.fpq_info["fingerprint"] == from_folder.fpq_info["fingerprint"]
    assert from_file.fpq_info["cache_key"] == from_folder.fpq_info["cache_key"]
    assert (_images(from_file) == _images(from_folder)).all()


def test_sdxl_single_file_loads_and_quantizes_like_its_folder(tmp_path) -> None:
    """SDXL's original layout: two text encoders (CLIP-L under ``conditioner.embedders.0``, OpenCLIP bigG with its
    fused q/k/v under ``conditioner.embedders.1``), micro-conditioning embeddings in the UNet."""
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    folder, single, config = _single_file_set(tmp_path, "sdxl")
    loaded = load_single_file_pipeline(single, config=config)
    assert isinstance(loaded, StableDiffusionXLPipeline)
    _assert_same_components(DiffusionPipeline.from_pretrained(str(folder)), loaded,
                            ("unet", "vae", "text_encoder", "text_encoder_2"))
    from_folder = FPQuantPipeline.from_pretrained(folder, "w8a8", cache_dir=tmp_path / "a", **KW)
    from_file = FPQuantPipeline.from_pretrained(single, "w8a8", config=config, cache_dir=tmp_path / "b", **KW)
    assert from_file.fpq_info["cache_key"] == from_folder.fpq_info["cache_key"]
    assert (_images(from_file) == _images(from_folder)).all()


def test_without_configs_the_error_says_what_to_pass(files, tmp_path) -> None:
    _, single, _ = files
    with pytest.raises(SingleFileConfigError, match="config=") as info:
        FPQuantPipeline.from_pretrained(single, "w8a16", cache_dir=tmp_path, **KW)
    assert str(single) in str(info.value) and "does not download" in str(info.value)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not opened")
    with pytest.raises(SingleFileConfigError, match="pickles"):
        load_single_file_pipeline(ckpt, config=files[2])
    with pytest.raises(SingleFileConfigError, match="model_index.json"):
        load_single_file_pipeline(single, config=tmp_path)
    with pytest.raises(CheckpointError, match="for single-file checkpoints"):
        FPQuantPipeline.from_pretrained(files[0], "w8a16", config=files[2], cache_dir=tmp_path, **KW)


def test_cli_quantizes_a_single_file(files, tmp_path, capsys) -> None:
    _, single, config = files
    out = tmp_path / "out"
    args = ["quantize", str(single), str(out), "--recipe", "w8a16", "--method", "fast", "--steps", "4",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 2
    assert "--config" in capsys.readouterr().err
    assert main([*args, "--config", str(config)]) == 0
    assert "calibrated" in capsys.readouterr().out
    reloaded = FPQuantPipeline.from_pretrained(out)
    assert reloaded.fpq_info["recipe"] == "w8a16"
    assert _images(reloaded).shape == (2, 32, 32, 3)
