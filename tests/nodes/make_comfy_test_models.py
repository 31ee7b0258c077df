"""Write a random-weight SD1.5-family model set that a real ComfyUI loads, for the node-pack server tests.

Run with the python of a ComfyUI environment (it builds the UNet and the VAE from ComfyUI's own classes and the
CLIP text encoder from transformers)::

    python tests/nodes/make_comfy_test_models.py --comfyui /path/to/ComfyUI --models-dir /tmp/x/models

Writes under ``--models-dir`` (seeded, so the files are the same on every run):

* ``diffusion_models/tiny_sd15_unet.safetensors``: an LDM-layout UNet (UNETLoader). ComfyUI's SD15 class matches on
  model_channels 320, context_dim 768, a 1x1-conv proj_in and no label embedding, so a two-level UNet
  (channel_mult [1, 1], one res block and one transformer per level) is loaded as "SD1.5" at 44M parameters.
* ``text_encoders/tiny_clip_l.safetensors``: CLIP-L in the Hugging Face layout (CLIPLoader, type stable_diffusion).
* ``vae/tiny_sd_vae.safetensors``: the SD VAE in the LDM layout (VAELoader).
* ``loras/tiny_lora.safetensors``: a rank-4 LoRA in the kohya layout on every attention and feed-forward Linear.
* ``diffusion_models/tiny_sd15_unet_comfy_fp8.safetensors`` (ComfyUI >= 0.8 only): the UNet in ComfyUI's own
  ``comfy_quant`` FP8 format, which fpq must refuse to quantize again.
* ``controlnet/tiny_sd15_controlnet.safetensors``: a ControlNet for that UNet in the LDM layout (ControlNetLoader),
  built from ComfyUI's ``cldm.ControlNet`` with random weights everywhere, its zero convolutions included, so that
  its residuals visibly change the image.

ComfyUI's CLIP and VAE configs are fixed, so those two are full size (they are cheap at 64x64 pixels).
Nothing is written into the ComfyUI checkout (run it with ``PYTHONDONTWRITEBYTECODE=1`` to avoid ``__pycache__``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,  # ComfyUI's SD15 class requires 320
    "context_dim": 768,  # and CLIP-L's width
    "use_linear_in_transformer": False,  # SD1.x: proj_in/proj_out are 1x1 convs
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 1],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "num_heads": 8,
    "num_head_channels": -1,
}

_INIT_BASES = (
    torch.nn.Linear,
    torch.nn.Conv2d,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
    torch.nn.Embedding,
)


def init_weights(module: torch.nn.Module) -> None:
    """Run torch's own ``reset_parameters`` on every layer.

    ComfyUI's ``comfy.ops`` layers override ``reset_parameters`` with a no-op, so a model built from them holds
    uninitialised memory; the torch base class of each layer does the real initialisation.
    """
    for m in module.modules():
        base = next((b for b in type(m).__mro__ if b in _INIT_BASES), None)
        if base is not None:
            base.reset_parameters(m)


def save(tensors: dict[str, torch.Tensor], path: str, dtype: torch.dtype = torch.float16) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, path, metadata={"note": "random weights for fpq tests"})


def make_unet(models_dir: str) -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(**UNET_CONFIG, device="cpu", operations=comfy.ops.disable_weight_init)
    init_weights(unet)
    sd = unet.state_dict()
    save(sd, os.path.join(models_dir, "diffusion_models", "tiny_sd15_unet.safetensors"))
    return sd


def make_clip(models_dir: str) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=0,
        eos_token_id=49407,
        pad_token_id=1,
    )
    sd = {}
    for k, v in CLIPTextModel(config).state_dict().items():
        if k.endswith("position_ids"):
            continue
        # transformers 5 drops the "text_model." prefix that ComfyUI (and real clip_l files) use.
        sd[k if k.startswith("text_model.") else "text_model." + k] = v
    # ComfyUI's CLIP-L has a text_projection (pooled output only; unused by SD1.5) that HF's model lacks.
    sd["text_projection.weight"] = torch.nn.Linear(768, 768, bias=False).weight
    save(sd, os.path.join(models_dir, "text_encoders", "tiny_clip_l.safetensors"))


def make_vae(models_dir: str) -> None:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    torch.manual_seed(2)
    ddconfig = {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    init_weights(vae)
    save(vae.state_dict(), os.path.join(models_dir, "vae", "tiny_sd_vae.safetensors"))


def make_lora(models_dir: str, unet_sd: dict[str, torch.Tensor], rank: int = 4) -> int:
    """A kohya-layout LoRA (``lora_unet_<diffusers name>``) on every Linear inside the transformer blocks."""
    import comfy.utils

    torch.manual_seed(3)
    lora = {}
    for diffusers_key, ldm_key in sorted(comfy.utils.unet_to_diffusers(UNET_CONFIG).items()):
        weight = unet_sd.get(ldm_key)
        if "attentions" not in diffusers_key or not diffusers_key.endswith(".weight"):
            continue
        if weight is None or weight.dim() != 2:
            continue
        out_f, in_f = weight.shape
        name = "lora_unet_" + diffusers_key[: -len(".weight")].replace(".", "_")
        # delta = up @ down has entries of about 1/sqrt(in_f): the size of the weights themselves, a visible change.
        lora[f"{name}.lora_down.weight"] = torch.randn(rank, in_f) / in_f**0.5
        lora[f"{name}.lora_up.weight"] = torch.randn(out_f, rank) / rank**0.5
        lora[f"{name}.alpha"] = torch.tensor(float(rank))
    save(lora, os.path.join(models_dir, "loras", "tiny_lora.safetensors"))
    return len(lora) // 3


def make_controlnet(models_dir: str, unet_config: dict | None = None,
                    name: str = "tiny_sd15_controlnet.safetensors") -> str:
    """A random-weight ControlNet for the UNet of ``unet_config`` (default: the test UNet); returns its path."""
    import comfy.ops
    from comfy.cldm.cldm import ControlNet

    torch.manual_seed(4)
    config = {k: v for k, v in (unet_config or UNET_CONFIG).items() if k != "out_channels"}
    net = ControlNet(**config, hint_channels=3, device="cpu", operations=comfy.ops.disable_weight_init)
    init_weights(net)  # real ControlNets start their zero convs at zero; random ones make the residuals matter
    path = os.path.join(models_dir, "controlnet", name)
    save(net.state_dict(), path)
    return path


def make_comfy_fp8_unet(models_dir: str, unet_sd: dict[str, torch.Tensor]) -> bool:
    """The UNet in ComfyUI's own FP8 format (``comfy_quant``, ComfyUI >= 0.8), to test that fpq refuses it.

    Every 2-D Linear weight becomes float8_e4m3fn with a per-tensor ``weight_scale`` and a ``<layer>.comfy_quant``
    JSON tensor. Returns False (and writes nothing) on ComfyUI versions without that format.
    """
    import json

    try:
        import comfy.quant_ops as qo
        from comfy.quant_ops import TensorCoreFP8E4M3Layout
    except ImportError:
        return False
    if not getattr(qo, "_CK_AVAILABLE", True):  # ComfyUI 0.8 makes this format through comfy_kitchen only
        return False
    out = {}
    for key, value in unet_sd.items():
        if key.endswith(".weight") and value.dim() == 2:
            layer = key[: -len(".weight")]
            codes, params = TensorCoreFP8E4M3Layout.quantize(value.float(), scale="recalculate")
            out[key] = codes
            out[layer + ".weight_scale"] = params.scale.reshape(())
            out[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        else:
            out[key] = value
    from safetensors.torch import save_file

    path = os.path.join(models_dir, "diffusion_models", "tiny_sd15_unet_comfy_fp8.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata={"note": json.dumps("fpq test model")})
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True, help="path of a ComfyUI checkout (only imported, never written)")
    ap.add_argument("--models-dir", required=True, help="where to write the models/ subfolders")
    args = ap.parse_args()

    sys.path.insert(0, os.path.abspath(args.comfyui))
    sys.argv = sys.argv[:1]  # ComfyUI parses the command line on import
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # no CUDA probing when ComfyUI is imported as a library
    unet_sd = make_unet(args.models_dir)
    make_clip(args.models_dir)
    make_vae(args.models_dir)
    n = make_lora(args.models_dir, unet_sd)
    make_controlnet(args.models_dir)
    native = make_comfy_fp8_unet(args.models_dir, unet_sd)
    print(f"wrote the test models under {args.models_dir} (LoRA on {n} layers, comfy_quant FP8 UNet: {native})")


if __name__ == "__main__":
    main()
