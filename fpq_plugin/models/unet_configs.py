"""UNet architectures of the Stable Diffusion family, built from configs without the model hub.

fpq quantizes ``diffusers.UNet2DConditionModel`` instances. Tests, benchmarks and memory estimates need the *real*
architectures (layer shapes, parameter counts) without downloading multi-gigabyte checkpoints, so this module
carries the public ``unet/config.json`` of each supported model as a Python literal, plus three tiny configs of the
same families for fast CPU tests.

The dicts hold only the keys ``UNet2DConditionModel.__init__`` needs; every other key of the published files is
either bookkeeping (``_class_name``, ``_diffusers_version``) or equal to the constructor default.

diffusers is imported inside functions only: ``import fpq_plugin`` must stay cheap and must work where diffusers
is not installed (e.g. the quantized-checkpoint loader in a ComfyUI process).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

from fpq_plugin.errors import RecipeError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import UNet2DConditionModel

__all__ = [
    "PREDICTION_TYPES",
    "SD15",
    "SD21",
    "SDXL",
    "TINY",
    "TINY_XL",
    "UNET_CONFIGS",
    "build_unet",
    "example_unet_inputs",
    "unet_config",
]

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

#: ``runwayml/stable-diffusion-v1-5`` ``unet/config.json`` (859,520,964 parameters).
SD15: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": list(_SD_DOWN),
    "up_block_types": list(_SD_UP),
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

#: ``stabilityai/stable-diffusion-2-1`` ``unet/config.json`` (865,910,724 parameters; v-prediction, 768 px).
SD21: dict[str, Any] = {
    "sample_size": 96,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": list(_SD_DOWN),
    "up_block_types": list(_SD_UP),
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
    # diffusers' historical misnomer: for SD2.x this is the number of heads per block (head dim is 64).
    "attention_head_dim": [5, 10, 20, 20],
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "num_class_embeds": None,
    # Attention in fp32 avoids the fp16 overflow SD2.1 is known for; it changes numerics, not shapes.
    "upcast_attention": True,
    "use_linear_projection": True,
}

#: ``stabilityai/stable-diffusion-xl-base-1.0`` ``unet/config.json`` (2,567,463,684 parameters).
SDXL: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    # Concatenated hidden states of CLIP ViT-L (768) and OpenCLIP ViT-bigG (1280).
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "num_class_embeds": None,
    "upcast_attention": None,
    "use_linear_projection": True,
    "resnet_time_scale_shift": "default",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    # 6 micro-conditioning scalars * 256 Fourier features + 1280 pooled text embedding.
    "projection_class_embeddings_input_dim": 2816,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "time_embedding_type": "positional",
}

#: Tiny SD1.5-family UNet (single-head-dim attention, conv proj_in) for fast CPU tests.
TINY: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "norm_num_groups": 8,
    "norm_eps": 1e-5,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}

#: Tiny SD2.x-family UNet: what sets SD2 apart from SD1 inside the UNet is linear proj_in/proj_out and a head
#: *dimension* per block (SD2.1: [5, 10, 20, 20]) instead of SD1's head count; the pipeline adds v-prediction.
TINY_SD2: dict[str, Any] = {
    **TINY,
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
}

#: Tiny SDXL-family UNet: text_time additional embeddings, linear projections, several transformer layers per
#: block. ``cross_attention_dim`` is 80 because the SDXL pipeline concatenates the hidden states of its two text
#: encoders (32 + 48 in the tiny pipeline), exactly like 768 + 1280 = 2048 in the real model; the two widths
#: differ, as in the real model, because diffusers' single-file loader tells the encoders apart by width.
TINY_XL: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "norm_num_groups": 8,
    "norm_eps": 1e-5,
    "cross_attention_dim": 80,
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    # 6 micro-conditioning scalars * 8 + 32 pooled text embedding (tiny text encoder 2 projection_dim).
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
}

UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": SD15,
    "sd21": SD21,
    "sdxl": SDXL,
    "tiny": TINY,
    "tiny-sd2": TINY_SD2,
    "tiny-xl": TINY_XL,
}

#: Scheduler ``prediction_type`` each model was trained with (not part of the UNet config, but needed to sample).
PREDICTION_TYPES: dict[str, str] = {
    "sd15": "epsilon",
    "sd21": "v_prediction",
    "sdxl": "epsilon",
    "tiny": "epsilon",
    "tiny-sd2": "v_prediction",
    "tiny-xl": "epsilon",
}

# Number of micro-conditioning scalars in SDXL's ``time_ids``: original (h, w), crop (top, left), target (h, w).
_NUM_TIME_IDS = 6
# Text sequence lengths used by example inputs: CLIP's context for real models, a short one for tiny ones so tests
# stay fast.
_REAL_SEQ_LEN = 77
_TINY_SEQ_LEN = 8
# Real SD text encoders have width >= 768; anything narrower is one of the tiny test configs.
_TINY_CROSS_ATTENTION_DIM_MAX = 256
# Latent-to-pixel scale of the real SD VAEs, used to fill plausible SDXL ``time_ids``.
_VAE_SCALE_FACTOR = 8


def unet_config(name: str) -> dict[str, Any]:
    """Return a private copy of a named UNet config.

    Args:
        name: One of the keys of :data:`UNET_CONFIGS` (``"sd15"``, ``"sd21"``, ``"sdxl"``, ``"tiny"``,
            ``"tiny-sd2"``, ``"tiny-xl"``).

    Returns:
        A deep copy, so callers may edit it without changing the module-level constant.

    Raises:
        RecipeError: ``name`` is not a known config.
    """
    try:
        config = UNET_CONFIGS[name]
    except (KeyError, TypeError):
        valid = ", ".join(repr(k) for k in UNET_CONFIGS)
        raise RecipeError(f"unknown UNet config {name!r}; valid names are {valid}") from None
    return copy.deepcopy(config)


def build_unet(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    meta: bool = False,
) -> UNet2DConditionModel:
    """Build a randomly initialised ``UNet2DConditionModel`` of a named architecture.

    Args:
        name: Config name, see :func:`unet_config`.
        dtype: Parameter dtype.
        device: Device to move the model to (ignored when ``meta`` is true).
        seed: Seed of the weight initialisation; the same seed gives bit-identical weights. The global torch RNG
            state is left untouched.
        meta: Build on the meta device (shapes only, no storage). Useful to count parameters or plan memory for
            the multi-gigabyte real models.

    Returns:
        The UNet in eval mode.

    Raises:
        RecipeError: ``name`` is not a known config.
    """
    config = unet_config(name)
    from diffusers import UNet2DConditionModel

    if meta:
        from accelerate import init_empty_weights

        # include_buffers: nothing at all gets real storage, so even SDXL costs no memory.
        with init_empty_weights(include_buffers=True):
            unet = UNet2DConditionModel.from_config(config)
        return _cast(unet, dtype=dtype).eval()

    # Initialise on CPU under a private RNG: weights then depend on `seed` only, not on the device or on
    # whatever the caller did with the global generator before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(config)
    # Module.to converts parameter by parameter, so the peak stays near the fp32 size.
    return _cast(unet, device=device, dtype=dtype).eval()


def _cast(unet: UNet2DConditionModel, **kwargs: Any) -> UNet2DConditionModel:
    """Move/cast a UNet with ``torch.nn.Module.to``.

    ``ModelMixin.to`` logs a spurious "should be kept in float32: []" warning on every dtype cast (diffusers 0.42
    warns even when the list is empty); the UNet has no fp32-only modules, so the plain module cast is equivalent.
    """
    return torch.nn.Module.to(unet, **kwargs)


def example_unet_inputs(
    unet: UNet2DConditionModel,
    batch: int = 2,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    seq_len: int | None = None,
) -> dict[str, Any]:
    """Make random keyword arguments for one ``unet(**kwargs)`` call.

    Args:
        unet: The model; shapes are derived from ``unet.config``.
        batch: Batch size.
        height: Latent height (latent pixels, i.e. image pixels / 8 for real models); defaults to
            ``config.sample_size``.
        width: Latent width; defaults to ``config.sample_size``.
        seed: Seed of the random tensors (a private CPU generator; the global RNG is untouched).
        dtype: Floating dtype of the tensors; defaults to the UNet's dtype.
        seq_len: Text sequence length; defaults to 77 for real configs and 8 for tiny ones.

    Returns:
        ``sample``, ``timestep``, ``encoder_hidden_states`` and, for SDXL-family (``text_time``) models,
        ``added_cond_kwargs`` with ``text_embeds`` and ``time_ids``. Tensors are on the UNet's device.
    """
    config = unet.config
    device = unet.device
    dtype = dtype if dtype is not None else unet.dtype
    sample_size = config.sample_size
    if isinstance(sample_size, (list, tuple)):
        default_h, default_w = sample_size
    else:
        default_h = default_w = sample_size
    height = default_h if height is None else height
    width = default_w if width is None else width
    cross_dim = config.cross_attention_dim
    if isinstance(cross_dim, (list, tuple)):
        cross_dim = cross_dim[0]
    if seq_len is None:
        seq_len = _TINY_SEQ_LEN if cross_dim < _TINY_CROSS_ATTENTION_DIM_MAX else _REAL_SEQ_LEN

    # Draw on CPU then move, so the values do not depend on the device (and meta models work too).
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config.in_channels, height, width, generator=gen)
    timestep = torch.randint(0, 1000, (batch,), generator=gen)
    encoder_hidden_states = torch.randn(batch, seq_len, cross_dim, generator=gen)
    kwargs: dict[str, Any] = {
        "sample": sample.to(device=device, dtype=dtype),
        "timestep": timestep.to(device=device),
        "encoder_hidden_states": encoder_hidden_states.to(device=device, dtype=dtype),
    }
    if config.addition_embed_type == "text_time":
        time_dim = config.addition_time_embed_dim * _NUM_TIME_IDS
        text_dim = config.projection_class_embeddings_input_dim - time_dim
        text_embeds = torch.randn(batch, text_dim, generator=gen)
        # Plausible micro-conditioning: original size = target size = image size, no crop.
        img_h, img_w = height * _VAE_SCALE_FACTOR, width * _VAE_SCALE_FACTOR
        time_ids = torch.tensor([img_h, img_w, 0, 0, img_h, img_w], dtype=torch.float32).repeat(batch, 1)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": text_embeds.to(device=device, dtype=dtype),
            "time_ids": time_ids.to(device=device, dtype=dtype),
        }
    return kwargs
