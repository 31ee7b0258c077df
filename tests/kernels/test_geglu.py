"""fpq_plugin.kernels.geglu: the one-pass GEGLU kernel against its PyTorch definition.

* CPU with ``TRITON_INTERPRET=1``: the kernel's indexing (rows, the two halves, ragged column blocks); the
  interpreter's float emulation is not PyTorch's, so values agree to two roundings of the output dtype (the GELU's
  and the product's), plus 1e-5 absolute where ``1 + erf`` cancels.
* GPU (``-m gpu``; CI has none, so they skip with that reason): against PyTorch's CUDA ``h * F.gelu(gate)`` in bf16
  and fp16 within two roundings of the output dtype (Triton's libdevice ``erf`` and PyTorch's differ by an fp32 ulp
  for some inputs, which flips ~1.5% of the rounded GELUs to the neighbouring value), and most elements identical.
* ``geglu_and_cast``: its product is the plain kernel's, bit for bit, and its FP8 cast is bit-identical to qops'
  activation cast of that product (in the interpreter: the interpreter's own cast, which is not round-to-nearest-even
  in a few percent of elements; on the GPU: also ``quantize_fp8_reference``).
"""

from __future__ import annotations

import pytest
import torch
from helpers import ULP, interp
from helpers import TRITON_INTERPRET as INTERP
from helpers import needs_cuda_triton as needs_cuda

from fpq_plugin.kernels import qops
from fpq_plugin.kernels.geglu import geglu, geglu_and_cast, geglu_and_cast_reference, geglu_reference, geglu_supported


# (leading shape, F): one row; ragged F (not a multiple of the 1024-column block); SD-like rows; a 3-d input
SHAPES = [((1,), 8), ((5,), 1100), ((64,), 1280), ((2, 77), 320)]


def _input(lead, f, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*lead, 2 * f, generator=g) * 3).to(device=device, dtype=dtype)


def test_reference_is_diffusers_geglu_arithmetic():
    y = _input((4,), 16, torch.float32, "cpu")
    h, gate = y[..., :16], y[..., 16:]
    torch.testing.assert_close(geglu_reference(y), h * 0.5 * gate * (1 + torch.erf(gate / 2**0.5)))


def test_cpu_tensors_are_not_supported():
    assert not geglu_supported(torch.ones(2, 4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="CUDA"):
        if not INTERP:
            geglu(torch.ones(2, 4, dtype=torch.bfloat16))
        else:
            raise RuntimeError("CUDA (the interpreter accepts CPU tensors)")


def test_odd_last_dimension_is_rejected():
    if not INTERP:
        pytest.skip("the shape check runs after the device check; needs the interpreter on the CPU")
    with pytest.raises(ValueError, match="even"):
        geglu(torch.ones(2, 5, dtype=torch.bfloat16))


@interp
@pytest.mark.parametrize("lead,f", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_logic_in_the_interpreter(lead, f, dtype):
    y = _input(lead, f, dtype, "cpu")
    out, ref = geglu(y), geglu_reference(y)
    assert out.shape == ref.shape == (*lead, f) and out.dtype == dtype and out.is_contiguous()
    err = (out.float() - ref.float()).abs()
    # + 1e-5: for gates below about -5, 1 + erf(gate / sqrt 2) cancels and the interpreter's erf is not CUDA's
    assert bool((err <= 2 * ULP[dtype] * ref.float().abs() + 1e-5).all()), float(err.max())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("lead,f", SHAPES + [((2, 4096), 1280), ((2, 1024), 5120)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_agrees_with_pytorch_on_the_gpu(lead, f, dtype):
    y = _input(lead, f, dtype, "cuda", seed=f)
    out, ref = geglu(y), geglu_reference(y)
    assert out.shape == ref.shape and out.dtype == dtype
    err = (out.float() - ref.float()).abs()
    h, gate = y.float().chunk(2, dim=-1)
    # two roundings of the output, plus the two erfs' fp32 difference (a few ulps of 1.0): for gate < -4,
    # 1 + erf(gate / sqrt 2) cancels and that absolute difference is a large share of the GELU
    bound = 2 * ULP[dtype] * ref.float().abs() + 2.0**-20 * (h * gate).abs() + torch.finfo(dtype).tiny
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"h={h.flatten()[worst]} gate={gate.flatten()[worst]} out={out.flatten()[worst]} ref={ref.flatten()[worst]}")
    assert (out != ref).float().mean().item() < 0.05


@pytest.mark.gpu
@needs_cuda
def test_a_non_contiguous_input_is_copied_first():
    y = _input((8,), 64, torch.bfloat16, "cuda")
    wide = torch.cat([y, y], dim=-1)[:, :128]  # rows 256 apart
    assert not wide.is_contiguous()
    assert torch.equal(geglu(wide), geglu(wide.contiguous()))


def _scale(device, value=0.01):
    # small enough that |out| / scale passes 448 for a few elements: the saturation is exercised too
    return torch.tensor(value, dtype=torch.float32, device=device)


def test_reference_cast_is_the_activation_cast_of_the_reference_product():
    y = _input((4,), 16, torch.bfloat16, "cpu")
    out, q = geglu_and_cast_reference(y, _scale("cpu"))
    assert torch.equal(out, geglu_reference(y))
    assert torch.equal(q.view(torch.uint8), qops.quantize_fp8_reference(out, _scale("cpu")).view(torch.uint8))


def test_cast_arguments_are_checked():
    y = torch.ones(2, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="act_dtype"):
        geglu_and_cast(y, _scale("cpu"), torch.int8)
    with pytest.raises(ValueError, match="one fp32 element"):
        geglu_and_cast(y, torch.ones(2), torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="one fp32 element"):
        geglu_and_cast(y, _scale("cpu").double(), torch.float8_e4m3fn)


def _check_cast(y, xs, act_dtype, exact_reference: bool):
    out, q = geglu_and_cast(y, xs, act_dtype)
    assert torch.equal(out, geglu(y)), "the product differs from the plain kernel's"
    assert q.shape == out.shape and q.dtype == act_dtype and q.is_contiguous()
    assert torch.equal(q.view(torch.uint8), qops.quantize_fp8(out, xs, act_dtype).view(torch.uint8))
    ref = qops.quantize_fp8_reference(out, xs, act_dtype)
    assert (q.float().abs() == qops._FMAX[act_dtype]).any(), "no element saturated: the test lost its clamp case"
    if exact_reference:
        assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))
    else:  # the interpreter's numpy conversion is not round-to-nearest-even for a few percent of elements
        assert (q.float() != ref.float()).float().mean().item() < 0.1


@interp
@pytest.mark.parametrize("lead,f", SHAPES[1:])
@pytest.mark.parametrize("act_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_cast_logic_in_the_interpreter(lead, f, act_dtype):
    scale = 0.01 if act_dtype == torch.float8_e4m3fn else 1e-4
    _check_cast(_input(lead, f, torch.bfloat16, "cpu"), _scale("cpu", scale), act_dtype, exact_reference=False)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("lead,f", SHAPES[1:] + [((2, 4096), 1280), ((2, 1024), 5120)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_cast_is_bit_identical_to_the_activation_cast_on_the_gpu(lead, f, dtype, act_dtype):
    scale = 0.01 if act_dtype == torch.float8_e4m3fn else 1e-4
    _check_cast(_input(lead, f, dtype, "cuda", seed=f), _scale("cuda", scale), act_dtype, exact_reference=True)
