"""Checkpoint format: bit-exact round trip, meta-device loading, and clear errors on every kind of bad file."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import fpq_plugin as fpq
from fpq_plugin.errors import CheckpointError
from fpq_plugin.io import parse_header, read_header
from fpq_plugin.io.header import METADATA_KEY
from fpq_plugin.models.unet_configs import build_unet, example_unet_inputs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A W4A8-quantized tiny UNet written to disk, with its inputs and output."""
    unet = build_unet("tiny")
    inputs = example_unet_inputs(unet)
    with torch.no_grad():
        fpq.quantize_(unet, "w4a8", calibration_fn=lambda m: m(**inputs))
        out = unet(**inputs).sample
    path = tmp_path_factory.mktemp("ckpt") / "tiny.fpq.safetensors"
    fpq.save_quantized(unet, path, recipe="w4a8", model_fingerprint="sha256:" + "ab" * 32, extra={"note": "test"})
    return path, unet, inputs, out


def _metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


def test_round_trip_is_bit_exact_without_a_model(saved) -> None:
    path, unet, inputs, out = saved
    loaded, header = fpq.load_quantized(path)  # builds the UNet from the header's config on the meta device
    original = unet.state_dict()
    restored = loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert original[key].dtype == restored[key].dtype and torch.equal(original[key], restored[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, out)
    assert header.recipe == fpq.get_recipe("w4a8")
    assert header.model_fingerprint == "sha256:" + "ab" * 32 and header.extra == {"note": "test"}
    assert set(header.layers) == set(fpq.quantized_layers(unet))


def test_loading_into_a_meta_skeleton_materialises_no_float_weights(saved) -> None:
    path, _, _, _ = saved
    skeleton = build_unet("tiny", meta=True)
    float_weight_bytes = sum(p.numel() * 4 for n, p in skeleton.named_parameters() if n.endswith("weight"))
    loaded, _ = fpq.load_quantized(path, skeleton)
    assert loaded is skeleton
    # Only quantized codes and the small float tensors (norms, biases) exist now.
    assert fpq.state_bytes(loaded) < 0.4 * float_weight_bytes
    assert not any(t.is_meta for t in loaded.state_dict().values())


def test_header_describes_the_file(saved) -> None:
    path, _, _, _ = saved
    raw = json.loads(_metadata(path)[METADATA_KEY])
    assert raw["format"] == "fpq.quantized-model" and raw["format_version"] == 1
    assert raw["model"]["class"] == "UNet2DConditionModel"
    spec = raw["layers"]["conv_in"]
    assert spec["kind"] == "conv2d" and spec["weight_format"] in ("e2m1", "e3m0", "e1m2")
    assert spec["input_format"] == "e4m3fn"


def test_write_is_atomic_and_leaves_no_temp_files(saved, tmp_path) -> None:
    _, unet, _, _ = saved
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old contents")
    fpq.save_quantized(unet, target, recipe="w4a8")
    assert read_header(target).recipe.name == "w4a8"
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_truncated_file(saved, tmp_path) -> None:
    path, _, _, _ = saved
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"cut{cut}.safetensors"):
            fpq.load_quantized(bad)


def test_tampered_tensor_data_is_detected(saved, tmp_path) -> None:
    path, _, _, _ = saved
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # flip one bit inside the last tensor
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the header's sha256"):
        fpq.load_quantized(bad)


def _rewrite(path, tmp_path, name: str, *, header_edit=None, tensor_edit=None):
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = fh.metadata()
    header = json.loads(meta[METADATA_KEY])
    if tensor_edit:
        tensor_edit(tensors)
        header["tensors_sha256"] = fpq.io.tensor_digest(tensors)
    if header_edit:
        header_edit(header)
    out = tmp_path / name
    save_file(tensors, str(out), metadata={METADATA_KEY: json.dumps(header)})
    return out


def test_unknown_version(saved, tmp_path) -> None:
    bad = _rewrite(saved[0], tmp_path, "v9.safetensors", header_edit=lambda h: h.update(format_version=9))
    with pytest.raises(CheckpointError, match="format version 9.*upgrade fpq"):
        fpq.load_quantized(bad)


def test_missing_and_misshaped_tensors(saved, tmp_path) -> None:
    path = saved[0]
    missing = _rewrite(path, tmp_path, "missing.safetensors", tensor_edit=lambda t: t.pop("conv_out.weight_scale"))
    with pytest.raises(CheckpointError, match=r"missing \['conv_out.weight_scale'\]"):
        fpq.load_quantized(missing)

    def reshape(t):
        t["conv_in.weight_codes"] = t["conv_in.weight_codes"][:, :-1].contiguous()

    misshaped = _rewrite(path, tmp_path, "shape.safetensors", tensor_edit=reshape)
    with pytest.raises(CheckpointError, match="'conv_in.weight_codes' has shape"):
        fpq.load_quantized(misshaped)

    def retype(t):
        t["conv_in.weight_scale"] = t["conv_in.weight_scale"].double()

    retyped = _rewrite(path, tmp_path, "dtype.safetensors", tensor_edit=retype)
    with pytest.raises(CheckpointError, match="'conv_in.weight_scale' has dtype torch.float64"):
        fpq.load_quantized(retyped)


def test_wrong_model_and_plain_safetensors(saved, tmp_path) -> None:
    path = saved[0]
    other = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(CheckpointError, match="layer 'conv_in' does not exist"):
        fpq.load_quantized(path, other)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not an fpq checkpoint"):
        fpq.load_quantized(plain)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        fpq.load_quantized(tmp_path / "absent.safetensors")


def test_saving_an_unquantized_model_is_refused(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no quantized layers"):
        fpq.save_quantized(torch.nn.Linear(2, 2), tmp_path / "x.safetensors", recipe="w8a8")


# ---- fuzzing the header parser ---------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(json_values, st.dictionaries(st.sampled_from([METADATA_KEY, "x"]), st.text(max_size=50))))
def test_fuzz_parser_raises_only_checkpoint_errors_on_random_input(metadata) -> None:
    try:
        parse_header(metadata if not isinstance(metadata, dict) else metadata)
    except CheckpointError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_parser_on_mutated_valid_headers(saved, data) -> None:
    header = json.loads(_metadata(saved[0])[METADATA_KEY])
    # Replace one field at some depth with a random JSON value, or delete it.
    target = header
    path = []
    while isinstance(target, dict) and target and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(target)))
        path.append(key)
        if not isinstance(target[key], dict):
            break
        target = target[key]
    if isinstance(target, dict) and target:
        key = data.draw(st.sampled_from(sorted(target)))
        if data.draw(st.booleans()):
            del target[key]
        else:
            target[key] = data.draw(json_values)
    try:
        parse_header({METADATA_KEY: json.dumps(header)})
    except CheckpointError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_file_bytes(saved, tmp_path_factory, data) -> None:
    raw = bytearray(saved[0].read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, min(len(raw) - 1, 4000)))  # mostly the header region
        raw[pos] = data.draw(st.integers(0, 255))
    bad = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    bad.write_bytes(bytes(raw))
    try:
        fpq.load_quantized(bad)
    except CheckpointError:
        pass
