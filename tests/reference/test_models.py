"""The shipped reference models load offline and do what the model card says."""

from __future__ import annotations

import pytest
import torch

from fpq_plugin.errors import CheckpointError
from fpq_plugin.reference.models import (
    IMAGE_SIZE,
    UNCOND_IMAGE_SIZE,
    load_classifier,
    load_t2i_pipeline,
    load_uncond_pipeline,
    reference_path,
)
from fpq_plugin.reference.scenes import ATTRIBUTES, render_scenes, sample_scenes, scene_labels


def _accuracy(judge, images, scenes) -> dict[str, float]:
    with torch.no_grad():
        logits = judge(images)
    labels = scene_labels(scenes)
    return {k: float((logits[k].argmax(-1) == labels[k]).float().mean()) for k in ATTRIBUTES}


def test_judge_reads_drawn_scenes() -> None:
    scenes = sample_scenes(256, 123)
    acc = _accuracy(load_classifier(), render_scenes(scenes, IMAGE_SIZE), scenes)
    assert min(acc.values()) >= 0.97, acc


def test_t2i_follows_prompts() -> None:
    torch.manual_seed(0)
    pipe = load_t2i_pipeline()
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    scenes = sample_scenes(8, 5)
    generator = torch.Generator().manual_seed(0)
    images = pipe(
        [s.caption for s in scenes], num_inference_steps=12, guidance_scale=5.0, generator=generator, output_type="pt"
    ).images
    assert images.shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE)
    acc = _accuracy(load_classifier(), images, scenes)
    # The model card reports ~1.0 colour/shape/background accuracy at 25 steps on 512 prompts; 8 prompts at 12
    # steps must still be far above chance (1/8 colours, 1/5 shapes, 1/4 backgrounds).
    assert acc["color"] >= 0.75 and acc["background"] >= 0.75 and acc["shape"] >= 0.6, acc


def test_uncond_generates_images() -> None:
    pipe = load_uncond_pipeline()
    out = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (2, UNCOND_IMAGE_SIZE, UNCOND_IMAGE_SIZE, 3)


def test_missing_weights_name_the_fix() -> None:
    with pytest.raises(CheckpointError, match="train_reference"):
        reference_path("no-such-model")


def test_gaussian_unet_init_keeps_the_variance_and_changes_the_shape() -> None:
    from fpq_plugin.reference.models import build_t2i_unet

    def stats(unet) -> tuple[list[float], list[float]]:
        variances, kurtosis = [], []
        for m in unet.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight[0].numel() >= 64:
                w = m.weight.detach().flatten().double()
                variances.append(float(w.var() * 3 * m.weight[0].numel()))  # 1.0 for PyTorch's default init
                kurtosis.append(float(((w - w.mean()) ** 4).mean() / w.var() ** 2 - 3))
        return variances, kurtosis

    default_var, default_kurt = stats(build_t2i_unet(init="default"))
    gauss_var, gauss_kurt = stats(build_t2i_unet(init="gaussian"))
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    assert abs(median(default_var) - 1) < 0.05 and abs(median(gauss_var) - 1) < 0.05
    assert median(default_kurt) < -1.0 and abs(median(gauss_kurt)) < 0.2  # uniform: -1.2; normal: 0
    with pytest.raises(ValueError, match="gaussian"):
        build_t2i_unet(init="laplace")
