"""Run a quantized model's GroupNorms through fpq's split-reduction kernel (:mod:`fpq_plugin.kernels.group_norm`).

Which ones: every ``nn.GroupNorm`` (diffusers' and ComfyUI's GroupNorm derive from it) that sits beside a layer fpq
quantized (a ResNet block's norms beside its convs, a transformer's norm beside ``proj_in``, the UNet's output norm
beside ``conv_out``): :func:`fpq_plugin.api.set_submodule` calls :func:`fuse_group_norms_beside` whenever it installs
a quantized layer. The module gets an instance forward; inputs the kernel does not cover (CPU, fp32, channels-last,
autograd, ``torch.compile`` tracing, a ComfyUI GroupNorm that casts offloaded weights or carries weight patches) run
the class's forward unchanged.
"""

from __future__ import annotations

from torch import nn

from fpq_plugin.nn.instance_forward import has_forward, install_forward, norm_call_is_plain, remove_forward

__all__ = ["fuse_group_norm", "fuse_group_norms_beside", "is_fused_group_norm", "unfuse_group_norm"]

_FLAG = "_fpq_fused_group_norm"

# Module-wide switch (benchmarks compare with it off).
ENABLED = True


def _fused_forward(self, x, *args, **kwargs):
    from fpq_plugin.kernels.group_norm import group_norm, group_norm_supported

    if (
        ENABLED
        and norm_call_is_plain(self, x, args, kwargs)
        and group_norm_supported(x, self.num_groups)
        and (self.weight is None or (self.weight.device == x.device and self.bias.device == x.device))
    ):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
    return type(self).forward(self, x, *args, **kwargs)


def fuse_group_norm(module: nn.Module) -> bool:
    """Give an ``nn.GroupNorm`` the fused forward; returns whether it has it. Idempotent."""
    if not isinstance(module, nn.GroupNorm):
        return False
    install_forward(module, _FLAG, _fused_forward)
    return True


def fuse_group_norms_beside(parent: nn.Module) -> int:
    """Fuse the GroupNorms among ``parent``'s direct children; returns how many it has now."""
    return sum(fuse_group_norm(m) for m in parent.children())


def unfuse_group_norm(module: nn.Module) -> None:
    remove_forward(module, _FLAG)


def is_fused_group_norm(module: nn.Module) -> bool:
    return has_forward(module, _FLAG)
