"""Write an SD1.x or SDXL diffusers pipeline as one original-layout (CompVis / SGM / A1111) ``.safetensors`` file.

Test helper: diffusers converts original single files to its own layout (``diffusers.loaders.single_file_utils``)
but ships no converter the other way inside the package, so the tests that load single files make one here. The
key names follow the original LDM layout that those converters read (``model.diffusion_model.input_blocks.N.M``,
``first_stage_model.encoder.down.N.block.M``, ``cond_stage_model.transformer.text_model.*``; SDXL's
``conditioner.embedders.0.transformer.text_model.*`` and the OpenCLIP ``conditioner.embedders.1.model.*``, whose
attention keeps q, k and v in one ``in_proj`` matrix and whose projection is stored transposed); only the top-level
renames are taken from diffusers' own ``DIFFUSERS_TO_LDM_MAPPING`` table. ``to_original_layout`` is checked
against diffusers' converters in tests/integrations/test_single_file.py (every tensor lands back on its own key).
"""

from __future__ import annotations

from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

_OPENCLIP_LAYER = (  # transformers CLIPEncoderLayer name -> OpenCLIP ResidualAttentionBlock name
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)

_UNET_RESNET = (  # diffusers ResnetBlock2D name -> LDM ResBlock name
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTENTION = (  # diffusers Attention (VAE mid block) -> LDM AttnBlock (1x1 convolutions)
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for new, old in pairs:
        if key.startswith(new):
            return old + key[len(new) :]
    raise KeyError(key)


def _unet_block_names(config: dict[str, Any]) -> dict[str, str]:
    """diffusers module prefix -> LDM prefix for every down/mid/up sub-block of a UNet2DConditionModel."""
    lpb = config["layers_per_block"]
    n = len(config["block_out_channels"])
    names = {}
    for b in range(n):
        for layer in range(lpb):
            i = 1 + b * (lpb + 1) + layer
            names[f"down_blocks.{b}.resnets.{layer}."] = f"input_blocks.{i}.0."
            names[f"down_blocks.{b}.attentions.{layer}."] = f"input_blocks.{i}.1."
        names[f"down_blocks.{b}.downsamplers.0.conv."] = f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op."
        has_attention = "CrossAttn" in config["up_block_types"][b]
        for layer in range(lpb + 1):
            i = b * (lpb + 1) + layer
            names[f"up_blocks.{b}.resnets.{layer}."] = f"output_blocks.{i}.0."
            names[f"up_blocks.{b}.attentions.{layer}."] = f"output_blocks.{i}.1."
        last = b * (lpb + 1) + lpb
        names[f"up_blocks.{b}.upsamplers.0.conv."] = f"output_blocks.{last}.{2 if has_attention else 1}.conv."
    names["mid_block.resnets.0."] = "middle_block.0."
    names["mid_block.attentions.0."] = "middle_block.1."
    names["mid_block.resnets.1."] = "middle_block.2."
    return names


def unet_to_original(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict in the LDM ``openaimodel.UNetModel`` layout (no prefix)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        top.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    blocks = sorted(_unet_block_names(config).items(), key=lambda kv: -len(kv[0]))
    out = {}
    for key, tensor in state.items():
        if key in top:
            out[top[key]] = tensor
            continue
        prefix, ldm = next(((p, q) for p, q in blocks if key.startswith(p)), (None, None))
        if prefix is None:
            raise KeyError(f"no original-layout name for UNet key {key!r}")
        rest = key[len(prefix) :]
        if ".resnets." in prefix:
            rest = _rename(rest, _UNET_RESNET)
        out[ldm + rest] = tensor  # attention blocks keep their inner names (proj_in, transformer_blocks...)
    return out


def vae_to_original(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in the LDM layout (no prefix)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(config["up_block_types"])
    names = {}
    for side in ("encoder", "decoder"):
        names[f"{side}.mid_block.resnets.0."] = f"{side}.mid.block_1."
        names[f"{side}.mid_block.resnets.1."] = f"{side}.mid.block_2."
        names[f"{side}.mid_block.attentions.0."] = f"{side}.mid.attn_1."
    for i in range(len(config["down_block_types"])):
        names[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        names[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
    for i in range(n_up):
        names[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{n_up - 1 - i}.block."  # LDM counts up blocks upward
        names[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{n_up - 1 - i}.upsample.conv."
    blocks = sorted(names.items(), key=lambda kv: -len(kv[0]))
    out = {}
    for key, tensor in state.items():
        if key in top.values() or key in top:
            out[top.get(key, key)] = tensor
            continue
        prefix, ldm = next(((p, q) for p, q in blocks if key.startswith(p)), (None, None))
        if prefix is None:
            raise KeyError(f"no original-layout name for VAE key {key!r}")
        rest = key[len(prefix) :]
        if "attn_1" in ldm:
            rest = _rename(rest, _VAE_ATTENTION)
            if tensor.ndim == 2:  # the LDM attention projections are 1x1 convolutions
                tensor = tensor[:, :, None, None]
        else:
            rest = rest.replace("conv_shortcut", "nin_shortcut")
        out[ldm + rest] = tensor
    return out


def openclip_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModelWithProjection`` state dict in the OpenCLIP text-tower layout (no prefix)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T,  # OpenCLIP computes x @ P, transformers x @ W.T
    }
    state.pop("embeddings.position_ids", None)  # a buffer of older transformers, not a weight
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
        for key in [k for k in state if k.startswith(src)]:
            out[dst + _rename(key[len(src):], _OPENCLIP_LAYER)] = state.pop(key)
    if state:
        raise KeyError(f"no OpenCLIP name for text encoder keys {sorted(state)}")
    return out


def to_original_layout(pipe: Any) -> dict[str, torch.Tensor]:
    """Every weight of an SD1.x ``StableDiffusionPipeline`` or a ``StableDiffusionXLPipeline`` under its original
    single-file key."""
    te = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
    out = {UNET_PREFIX + k: v for k, v in unet_to_original(pipe.unet.state_dict(), dict(pipe.unet.config)).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_original(pipe.vae.state_dict(), dict(pipe.vae.config)).items()})
    if getattr(pipe, "text_encoder_2", None) is None:
        out.update({CLIP_PREFIX + k: v for k, v in te.items()})
    else:
        out.update({SDXL_CLIP_PREFIX + k: v for k, v in te.items()})
        te2 = openclip_to_original(pipe.text_encoder_2.state_dict())
        out.update({SDXL_OPENCLIP_PREFIX + k: v for k, v in te2.items()})
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def save_original_single_file(pipe: Any, path: str) -> str:
    """Write :func:`to_original_layout` of ``pipe`` to ``path`` (safetensors)."""
    from safetensors.torch import save_file

    save_file(to_original_layout(pipe), path)
    return path
