"""The load-dtype keyword matches the installed diffusers: the reference pipelines load in the asked dtype and
without diffusers' deprecation warning for the old name."""

from __future__ import annotations

import warnings

import torch

from fpq_plugin.integrations.diffusers_compat import dtype_kwargs
from fpq_plugin.reference.models import load_uncond_pipeline


def test_dtype_kwargs_names_one_keyword() -> None:
    kwargs = dtype_kwargs(torch.float16)
    assert list(kwargs.values()) == [torch.float16]
    assert set(kwargs) <= {"dtype", "torch_dtype"} and len(kwargs) == 1


def test_reference_pipeline_loads_in_the_dtype_without_a_deprecation_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_uncond_pipeline(dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16
    dtype_warnings = [str(w.message) for w in caught if "torch_dtype" in str(w.message)]
    assert not dtype_warnings, dtype_warnings
