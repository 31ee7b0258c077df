"""When ComfyUI's UNet call may replay a CUDA graph: the ``check`` the node pack gives
:class:`~fpq_plugin.integrations.cuda_graphs.GraphedForward` (no ComfyUI import, so it is tested anywhere).

What ComfyUI 0.8.0 reads from ``transformer_options`` inside ``UNetModel.forward`` (openaimodel.py, attention.py):
``wrappers`` (diffusion-model wrappers around ``_forward``), ``patches`` (input/output block, attention and
timestep-embed patches), ``patches_replace`` (attention replacements) and ``optimized_attention_override``. Every
other entry (``sigmas``, ``sample_sigmas``, ``cond_or_uncond``, ``uuids``, and the ``block`` / ``transformer_index``
/ ``original_shape`` / ``activations_shape`` bookkeeping the forward writes) is only handed on to those patches.
"""

from __future__ import annotations

import os


def graph_controlnet_from_env(environ=os.environ) -> bool:
    """``FPQ_GRAPH_CONTROLNET=0`` in ComfyUI's environment switches :data:`GRAPH_CONTROLNET` off (ComfyUI users
    cannot set a module attribute; an environment variable they can). Anything else, or unset, leaves it on."""
    return environ.get("FPQ_GRAPH_CONTROLNET", "").strip().lower() not in ("0", "false", "no", "off")


#: Replay graphs for calls with ControlNet residuals too. They are ordinary per-step tensors of fixed shapes (graph
#: inputs, copied in like the latent); ComfyUI's UNet pops them off the lists it is handed, which the capture
#: survives because each warm-up and the capture get fresh containers (cuda_graphs.GraphedForward). Checked in a
#: real ComfyUI 0.8.0 server on an H100 (tests/nodes: the replayed ControlNet image equals the eager one) and
#: measured there: SD1.5 512x512 W8A8 with a ControlNet 94.6 -> 38.1 ms per step (plain ComfyUI 61.1;
#: benchmarks/results/comfyui_speed_h100.json). ``FPQ_GRAPH_CONTROLNET=0`` keeps ControlNet steps eager.
GRAPH_CONTROLNET = graph_controlnet_from_env()


def comfyui_unet_check(args: tuple, kwargs: dict) -> str | None:
    """Why this call of ComfyUI's ``UNetModel.forward(x, timesteps, context, y, control, transformer_options)``
    must run eagerly, or None.

    A replay repeats the captured kernels, so anything that changes the computation from outside the arguments'
    tensors has to keep the call eager: a ControlNet if :data:`GRAPH_CONTROLNET` is off (its residuals are per-step
    tensors the replay copies in), attention or block patches
    (IPAdapter, hypernetworks, FreeU...: ``patches`` / ``patches_replace``), diffusion-model wrappers, and an
    attention override. Without those, the UNet reads nothing from ``transformer_options`` that changes its
    math (it writes bookkeeping there for patches), which is why the graphs leave that argument out.
    """
    control = kwargs.get("control", args[4] if len(args) > 4 else None)
    if control is not None and not GRAPH_CONTROLNET:
        return "a ControlNet is connected and FPQ_GRAPH_CONTROLNET=0 keeps its steps eager"
    options = kwargs.get("transformer_options", args[5] if len(args) > 5 else None) or {}
    for key in ("patches", "patches_replace"):
        if any(options.get(key, {}).values()):
            return f"the model has {key} (attention or block patches)"
    if any((options.get("wrappers") or {}).get("diffusion_model", {}).values()):
        return "the model has diffusion-model wrappers"
    if "optimized_attention_override" in options:
        return "an attention override is set"
    return None
