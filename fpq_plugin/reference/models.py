"""Architectures of fpq's reference models and where their shipped weights live.

Three models are trained on :mod:`fpq_plugin.reference.scenes` (training script: ``training/train_reference.py``,
model card: ``fpq_plugin/reference/weights/MODEL_CARD.md``):

- ``scenes-t2i``: a text-to-image latent diffusion pipeline with Stable Diffusion 1.x's architecture
  (``StableDiffusionPipeline``: CLIP text encoder, ``UNet2DConditionModel`` with cross-attention, ``AutoencoderKL``,
  epsilon prediction on SD's scaled-linear schedule, classifier-free guidance). 64x64 images, 16x16x4 latents.
- ``scenes-uncond``: an unconditional pixel-space ``UNet2DModel`` with a DDIM sampler (32x32 images),
  the setting of the paper's unconditional experiments.
- ``scenes-judge``: :class:`AttributeClassifier`, a small CNN that reads every scene attribute back from an image;
  the evaluation harness uses its predictions for prompt accuracy and its pooled features for FID.

Everything here builds from configs; diffusers and transformers are imported inside functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fpq_plugin.errors import CheckpointError
from fpq_plugin.integrations.diffusers_compat import dtype_kwargs
from fpq_plugin.reference.scenes import ATTRIBUTES, caption_vocabulary

__all__ = [
    "IMAGE_SIZE",
    "UNCOND_IMAGE_SIZE",
    "WEIGHTS_DIR",
    "AttributeClassifier",
    "UNET_INITS",
    "build_t2i_pipeline",
    "build_t2i_unet",
    "build_uncond_pipeline",
    "gaussian_init_",
    "load_classifier",
    "load_t2i_pipeline",
    "load_uncond_pipeline",
    "reference_path",
]

IMAGE_SIZE = 64
UNCOND_IMAGE_SIZE = 32
#: Where the trained weights ship inside the package.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

TEXT_HIDDEN = 256

UNET_CONFIG: dict[str, Any] = {
    # SD1.x's block structure (cross-attention in every level but the deepest, 2 resnets per level, 8 heads,
    # GroupNorm 32, linear proj in/out like SD2) at 1/5 of its width and 3 levels instead of 4 for 16x16 latents.
    "sample_size": IMAGE_SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (64, 128, 192),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": TEXT_HIDDEN,
    "norm_num_groups": 32,
}

VAE_CONFIG: dict[str, Any] = {
    # Three levels -> 4x downsampling: 64x64 images to 16x16x4 latents (SD uses 8x at 512x512).
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (32, 64, 128),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": IMAGE_SIZE,
}

UNCOND_CONFIG: dict[str, Any] = {
    "sample_size": UNCOND_IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 128),
    "layers_per_block": 2,
    "norm_num_groups": 32,
}


def _text_config(eos_id: int, bos_id: int) -> Any:
    from transformers import CLIPTextConfig

    from fpq_plugin.models.tiny_pipeline import TEXT_MAX_LENGTH, TEXT_VOCAB_SIZE

    return CLIPTextConfig(
        vocab_size=TEXT_VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=TEXT_MAX_LENGTH,
        hidden_act="quick_gelu",  # as SD1.x's CLIP ViT-L
        layer_norm_eps=1e-5,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def _t2i_scheduler() -> Any:
    from fpq_plugin.models.tiny_pipeline import sd_scheduler

    return sd_scheduler("ddim")


def _uncond_scheduler() -> Any:
    from diffusers import DDIMScheduler

    # The DDPM paper's linear schedule and epsilon prediction, as in the unconditional (CIFAR/LSUN) models the paper
    # quantizes. (A v-prediction variant is supported by the training script; 656 steps of it were not better than
    # the shipped epsilon model's 1.9k, see the model card.)
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=True
    )


#: Initialisations of a fresh t2i UNet's Linear and Conv2d weights (see :func:`build_t2i_unet`).
UNET_INITS = ("default", "gaussian")


@torch.no_grad()
def gaussian_init_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Redraw every Linear and Conv2d weight of ``module`` from N(0, 1 / (3 fan_in)): the variance of PyTorch's
    default (kaiming-uniform) initialisation, with a bell-shaped distribution instead of a flat one. Biases, norms
    and embeddings are left as they are. Returns ``module``."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            fan_in = layer.weight[0].numel()
            noise = torch.randn(layer.weight.shape, generator=generator, dtype=torch.float32)
            layer.weight.copy_(noise * (3 * fan_in) ** -0.5)
    return module


def build_t2i_unet(seed: int = 0, init: str = "default") -> Any:
    """A freshly initialised ``scenes-t2i`` ``UNet2DConditionModel``, float32 on CPU.

    Args:
        seed: Seed of the initial weights; the caller's RNG is left untouched.
        init: ``"default"``: diffusers' layers as built (PyTorch's kaiming-uniform weights). ``"gaussian"``: the
            same variance, normally distributed (:func:`gaussian_init_`). Why it matters here: a short training run
            barely moves weights from their initialisation, and the shipped UNet, started uniform, still has a
            median excess kurtosis of -1.1 after 3.4k steps, where long-trained Stable Diffusion weights are
            bell-shaped; on near-uniform weights INT4's even grid wins over FP4 by construction, so FP-vs-INT
            comparisons on such a model say little about real ones.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _new_t2i_unet(seed, init)


def _new_t2i_unet(seed: int, init: str) -> Any:
    """The UNet drawn from the global RNG as it stands (callers seed it), then redrawn by ``init``."""
    from diffusers import UNet2DConditionModel

    if init not in UNET_INITS:
        raise ValueError(f"unknown UNet initialisation {init!r}; choose one of {', '.join(UNET_INITS)}")
    unet = UNet2DConditionModel(**UNET_CONFIG)
    if init == "gaussian":
        gaussian_init_(unet, torch.Generator().manual_seed(seed))
    return unet


def build_t2i_pipeline(tokenizer_dir: str | os.PathLike[str], seed: int = 0, unet_init: str = "default") -> Any:
    """A freshly initialised ``scenes-t2i`` pipeline (for training), float32 on CPU.

    Args:
        tokenizer_dir: Where to write the tokenizer files (they must outlive the pipeline until it is saved).
        seed: Seed of the initial weights; the caller's RNG is left untouched.
        unet_init: How the UNet's weights start (:func:`build_t2i_unet`).
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from fpq_plugin.models.tiny_pipeline import TEXT_MAX_LENGTH, write_tiny_tokenizer

    write_tiny_tokenizer(tokenizer_dir, corpus=caption_vocabulary())
    tokenizer = CLIPTokenizer.from_pretrained(
        str(tokenizer_dir), model_max_length=TEXT_MAX_LENGTH, pad_token="<|endoftext|>", local_files_only=True
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _new_t2i_unet(seed, unet_init)  # first, as before the option existed: same VAE/text weights
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(_text_config(tokenizer.eos_token_id, tokenizer.bos_token_id))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_t2i_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_uncond_pipeline(seed: int = 0) -> Any:
    """A freshly initialised ``scenes-uncond`` ``DDIMPipeline`` (for training), float32 on CPU."""
    from diffusers import DDIMPipeline, UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(**UNCOND_CONFIG)
    pipe = DDIMPipeline(unet=unet, scheduler=_uncond_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


class AttributeClassifier(nn.Module):
    """Reads every scene attribute from an image; its pooled features are the FID feature space.

    Five stride-2 conv stages (64 -> 4 pixels), GroupNorm + SiLU, global average pooling to a 256-d feature, one
    linear head per attribute. Any input size works (global pooling); inputs are RGB in [0, 1].
    """

    FEATURES = 256

    def __init__(self) -> None:
        super().__init__()
        widths = (32, 64, 128, 192, self.FEATURES)
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            cin = w
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(self.FEATURES, len(values)) for name, values in ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled ``(n, 256)`` features of images in [0, 1]."""
        return self.body(images * 2 - 1).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}


def reference_path(name: str) -> Path:
    """Path of a shipped reference model (``scenes-t2i``, ``scenes-uncond`` or ``scenes-judge.safetensors``).

    Raises:
        CheckpointError: The weights are not installed (a source checkout without them, or a trimmed install).
    """
    path = WEIGHTS_DIR / name
    if not path.exists():
        raise CheckpointError(
            f"reference model {name!r} not found at {path}; reinstall fpq-plugin, or train it with "
            "`python training/train_reference.py` and copy the result there"
        )
    return path


def load_t2i_pipeline(
    path: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32, unet: Any = None
) -> Any:
    """Load the trained ``scenes-t2i`` ``StableDiffusionPipeline`` (shipped fp16, upcast to ``dtype``).

    ``unet``: use this UNet instead of the folder's (which is then never read, so it may be absent): training a new
    UNet against the shipped VAE and text encoder.
    """
    from diffusers import StableDiffusionPipeline

    folder = Path(path) if path is not None else reference_path("scenes-t2i")
    extra = {"unet": unet} if unet is not None else {}
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder), **dtype_kwargs(dtype), local_files_only=True, **extra
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_uncond_pipeline(path: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32) -> Any:
    """Load the trained ``scenes-uncond`` ``DDIMPipeline``."""
    from diffusers import DDIMPipeline

    folder = Path(path) if path is not None else reference_path("scenes-uncond")
    pipe = DDIMPipeline.from_pretrained(str(folder), **dtype_kwargs(dtype), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_classifier(path: str | os.PathLike[str] | None = None) -> AttributeClassifier:
    """Load the trained attribute classifier (float32, eval mode)."""
    from safetensors.torch import load_file

    file = Path(path) if path is not None else reference_path("scenes-judge.safetensors")
    model = AttributeClassifier()
    try:
        state = load_file(str(file))
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except (RuntimeError, OSError) as exc:  # safetensors raises these for truncated files and key mismatches
        raise CheckpointError(f"{file}: not a valid attribute-classifier checkpoint ({exc})") from exc
    return model.eval()
