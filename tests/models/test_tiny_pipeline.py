"""Tests of fpq_plugin.models.tiny_pipeline: tiny SD1.5/SDXL pipelines built from configs, offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fpq_plugin.errors import RecipeError
from fpq_plugin.models.tiny_pipeline import (
    TEXT_VOCAB_SIZE,
    _bytes_to_unicode,
    build_tiny_pipeline,
    save_tiny_pipeline,
)

PROMPT = "a red square"


def _generate(pipe: object, seed: int = 0) -> np.ndarray:
    return pipe(  # type: ignore[operator]
        PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(seed), output_type="np"
    ).images


def test_sd15_generation_is_deterministic() -> None:
    from diffusers import StableDiffusionPipeline

    pipe = build_tiny_pipeline("sd15", seed=0)
    assert isinstance(pipe, StableDiffusionPipeline)
    a = _generate(pipe)
    assert a.shape == (1, 32, 32, 3)
    assert np.isfinite(a).all()
    assert np.array_equal(a, _generate(pipe))
    # Same seed, freshly built: identical weights, identical image.
    assert np.array_equal(a, _generate(build_tiny_pipeline("sd15", seed=0)))
    assert not np.array_equal(a, _generate(build_tiny_pipeline("sd15", seed=1)))


def test_sd15_save_and_reload_identical(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    folder = save_tiny_pipeline(tmp_path / "tiny-sd15", "sd15", seed=0)
    reloaded = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    assert np.array_equal(_generate(build_tiny_pipeline("sd15", seed=0)), _generate(reloaded))


def test_sdxl_kind_works_and_reloads(tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    pipe = build_tiny_pipeline("sdxl", seed=0)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.unet.config.addition_embed_type == "text_time"
    image = _generate(pipe)
    assert image.shape == (1, 32, 32, 3)
    assert np.isfinite(image).all()
    assert np.array_equal(image, _generate(pipe))

    folder = save_tiny_pipeline(tmp_path / "tiny-sdxl", "sdxl", seed=0)
    reloaded = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert isinstance(reloaded, StableDiffusionXLPipeline)
    reloaded.set_progress_bar_config(disable=True)
    assert np.array_equal(image, _generate(reloaded))


def test_sd2_kind_is_v_prediction_with_linear_projections(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = build_tiny_pipeline("sd2", seed=0)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.use_linear_projection and pipe.text_encoder.config.hidden_act == "gelu"
    # Linear proj_in (SD2) where SD1 has a 1x1 convolution.
    assert isinstance(pipe.unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    image = _generate(pipe)
    assert np.isfinite(image).all() and not np.array_equal(image, _generate(build_tiny_pipeline("sd15", seed=0)))
    folder = save_tiny_pipeline(tmp_path / "tiny-sd2", "sd2", seed=0)
    reloaded = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.scheduler.config.prediction_type == "v_prediction"
    assert np.array_equal(image, _generate(reloaded))


def test_euler_scheduler() -> None:
    from diffusers import EulerDiscreteScheduler

    pipe = build_tiny_pipeline("sd15", scheduler="euler")
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert np.isfinite(_generate(pipe)).all()


@pytest.mark.parametrize(("kwargs", "match"), [({"kind": "sd3"}, "kind"), ({"scheduler": "pndm"}, "scheduler")])
def test_bad_arguments_raise_recipe_error(kwargs: dict[str, str], match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        build_tiny_pipeline(**kwargs)
    if "kind" in kwargs:
        with pytest.raises(RecipeError):
            save_tiny_pipeline("unused", kwargs["kind"])


def test_tokenizer_is_consistent_with_text_encoder(tmp_path: Path) -> None:
    pipe = build_tiny_pipeline("sdxl", tokenizer_dir=tmp_path / "tok")
    assert (tmp_path / "tok" / "vocab.json").is_file() and (tmp_path / "tok" / "merges.txt").is_file()
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        config = encoder.config
        assert len(tokenizer) == config.vocab_size == TEXT_VOCAB_SIZE
        assert tokenizer.bos_token_id == config.bos_token_id
        assert tokenizer.eos_token_id == config.eos_token_id
        assert tokenizer.pad_token_id == config.pad_token_id
        assert tokenizer.model_max_length == config.max_position_embeddings == 77
    vocab = pipe.tokenizer.get_vocab()
    for char in _bytes_to_unicode().values():
        assert char in vocab and char + "</w>" in vocab
    # Merges make common words single tokens: bos + 3 words + eos.
    assert len(pipe.tokenizer(PROMPT).input_ids) == 5
    # Any text, including non-ASCII, encodes without unknown tokens and round-trips.
    ids = pipe.tokenizer("zebra über 42!").input_ids
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "zebraüber42!"
