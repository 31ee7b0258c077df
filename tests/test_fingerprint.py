"""Model fingerprints: sensitive to any weight change the modes promise to see, blind to order, layout and device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fpq_plugin.fingerprint import (
    SAMPLE_CHUNK_BYTES,
    SAMPLE_CHUNKS,
    SMALL_TENSOR_BYTES,
    _gather_probes,
    _sample_offsets,
    fingerprint_module,
    fingerprint_state_dict,
)
from fpq_plugin.models.unet_configs import build_unet

MODES = ("full", "sampled")


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in build_unet("tiny").state_dict().items()}


def _is_fingerprint(s: str) -> bool:
    return s.startswith("sha256:") and len(s) == 71 and all(c in "0123456789abcdef" for c in s[7:])


@pytest.mark.parametrize("mode", MODES)
def test_same_weights_same_fingerprint_in_any_order(tiny_state, mode) -> None:
    reordered = dict(reversed(list(tiny_state.items())))
    a = fingerprint_state_dict(tiny_state, mode=mode)
    assert _is_fingerprint(a)
    assert fingerprint_state_dict(reordered, mode=mode) == a
    assert fingerprint_state_dict(tiny_state, mode=mode, workers=4) == a  # threads do not change the result


def test_modes_differ_and_module_matches_its_state_dict(tiny_state) -> None:
    unet = build_unet("tiny")
    assert fingerprint_module(unet) == fingerprint_state_dict(tiny_state)
    assert fingerprint_module(unet, mode="full") == fingerprint_state_dict(tiny_state, mode="full")
    assert fingerprint_state_dict(tiny_state, mode="full") != fingerprint_state_dict(tiny_state, mode="sampled")


@pytest.mark.parametrize("mode", MODES)
def test_one_changed_element_changes_it(tiny_state, mode) -> None:
    # The tiny model's tensors are all small, so sampled mode hashes every byte of every tensor.
    assert max(t.numel() * t.element_size() for t in tiny_state.values()) <= SMALL_TENSOR_BYTES
    before = fingerprint_state_dict(tiny_state, mode=mode)
    for name in ("conv_in.weight", "down_blocks.0.resnets.0.norm1.bias", "conv_out.weight"):
        changed = dict(tiny_state)
        t = tiny_state[name].clone()
        flat = t.view(-1)
        flat[flat.numel() // 3] = torch.nextafter(flat[flat.numel() // 3], torch.tensor(float("inf")))
        changed[name] = t
        assert fingerprint_state_dict(changed, mode=mode) != before, name


def test_names_dtypes_and_shapes_count(tiny_state) -> None:
    before = fingerprint_state_dict(tiny_state)
    renamed = dict(tiny_state)
    renamed["conv_in.weight_renamed"] = renamed.pop("conv_in.weight")
    assert fingerprint_state_dict(renamed) != before
    assert fingerprint_state_dict({k: v.half() for k, v in tiny_state.items()}) != before
    reshaped = dict(tiny_state)
    reshaped["conv_out.bias"] = tiny_state["conv_out.bias"].reshape(1, -1)
    assert fingerprint_state_dict(reshaped) != before


def test_non_floating_tensors_are_ignored(tiny_state) -> None:
    before = fingerprint_state_dict(tiny_state)
    with_buffers = {**tiny_state, "position_ids": torch.arange(77), "num_batches_tracked": torch.tensor(3)}
    assert fingerprint_state_dict(with_buffers) == before
    module = nn.Linear(4, 4)
    module.register_buffer("steps", torch.zeros(2, dtype=torch.int64))
    module.register_buffer("float_buffer", torch.ones(2))
    assert fingerprint_module(module) == fingerprint_state_dict(dict(module.named_parameters()))


@pytest.mark.parametrize("mode", MODES)
def test_layout_and_device_do_not_matter(tiny_state, mode) -> None:
    before = fingerprint_state_dict(tiny_state, mode=mode)
    # Same values in another memory layout (transposed storage) and inside a larger storage (offset view).
    other = {}
    for k, v in tiny_state.items():
        if v.dim() == 2:
            other[k] = v.t().contiguous().t()
        else:
            other[k] = torch.cat([torch.zeros(5, dtype=v.dtype), v.reshape(-1)])[5:].view(v.shape)
    assert not other["time_embedding.linear_1.weight"].is_contiguous()
    assert fingerprint_state_dict(other, mode=mode) == before
    big = _large_tensor()
    assert fingerprint_state_dict({"w": big.t().contiguous().t()}, mode=mode) == fingerprint_state_dict(
        {"w": big}, mode=mode
    )
    if torch.cuda.is_available():
        assert fingerprint_state_dict({k: v.cuda() for k, v in tiny_state.items()}, mode=mode) == before
        assert fingerprint_state_dict({"w": big.cuda()}, mode=mode) == fingerprint_state_dict({"w": big}, mode=mode)


def _large_tensor() -> torch.Tensor:
    """fp16, 2 MiB: above the sampled mode's full-hash size, so it is probed."""
    t = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(1)).half()
    assert t.numel() * t.element_size() > SMALL_TENSOR_BYTES
    return t


def test_sampled_mode_probes_start_middle_end_and_misses_the_rest() -> None:
    big = _large_tensor()
    nbytes = big.numel() * 2
    base = {"w": big}
    fp_sampled, fp_full = fingerprint_state_dict(base, mode="sampled"), fingerprint_state_dict(base, mode="full")
    step = (nbytes - SAMPLE_CHUNK_BYTES) // (SAMPLE_CHUNKS - 1)
    probed = (0, nbytes // 2, nbytes - 2)  # first element, middle, last element
    unprobed = SAMPLE_CHUNK_BYTES + step // 2  # between the first two probes (documented blind spot)
    assert SAMPLE_CHUNK_BYTES < unprobed < step
    for byte_offset in (*probed, unprobed):
        changed = big.clone()
        changed.view(-1)[byte_offset // 2] += 1.0
        assert fingerprint_state_dict({"w": changed}, mode="full") != fp_full
        detected = fingerprint_state_dict({"w": changed}, mode="sampled") != fp_sampled
        assert detected == (byte_offset in probed), byte_offset
    # A realistic fine-tune or merge changes every element, so every probe sees it.
    assert fingerprint_state_dict({"w": big * 0.999 + 0.001}, mode="sampled") != fp_sampled


def test_device_side_gather_equals_the_cpu_probes() -> None:
    # Off-CPU tensors gather their probes with as_strided/cat on the device; on CPU the probes are memoryview
    # slices. Both must give the same bytes (checked here on CPU, also for a view with a storage offset).
    backing = torch.cat([torch.zeros(3, dtype=torch.float16), _large_tensor().reshape(-1)])
    for u8 in (_large_tensor().reshape(-1).view(torch.uint8), backing[3:].view(torch.uint8)):
        view = memoryview(u8.numpy())
        expected = b"".join(bytes(view[o : o + SAMPLE_CHUNK_BYTES]) for o in _sample_offsets(u8.numel()))
        assert bytes(_gather_probes(u8).numpy()) == expected


def test_errors() -> None:
    with pytest.raises(ValueError, match="mode"):
        fingerprint_state_dict({"w": torch.zeros(2)}, mode="fast")
    with pytest.raises(ValueError, match="no floating-point tensors"):
        fingerprint_state_dict({"codes": torch.zeros(2, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="meta device"):
        fingerprint_module(build_unet("tiny", meta=True))


@pytest.mark.parametrize("mode", ["full", "sampled"])
def test_module_made_in_inference_mode_and_moved_outside_it(mode) -> None:
    """ComfyUI builds models under torch.inference_mode; once such a model is moved outside it (model unloading),
    its Parameters have no version counter and a view of ``detach()`` fails. The fingerprint must still read them."""
    torch.manual_seed(0)
    normal = nn.Linear(256, 1024)  # 1 MiB weight: large enough for sampled mode's probes
    with torch.inference_mode():
        made_inside = nn.Linear(256, 1024)
        made_inside.load_state_dict(normal.state_dict())
    made_inside.to(torch.float64).to(torch.float32)  # moved outside inference mode
    with pytest.raises(RuntimeError, match="version counter"):
        made_inside.weight.detach().reshape(-1)  # the failure this test guards against
    assert fingerprint_module(made_inside, mode=mode) == fingerprint_module(normal, mode=mode)
