"""CUDA-graph replay of a UNet forward (``fpq_plugin.integrations.cuda_graphs``).

The GPU tests run real diffusers UNets (tiny configs, fpq W8A8 and bf16) and check that a replay returns exactly
what the eager forward returns, and every rule that sends a call back to eager mode. The CPU tests check what a
machine without CUDA sees: the wrapper is transparent.
"""

from __future__ import annotations

import copy
import importlib.util
import logging

import pytest
import torch

import fpq_plugin as fpq
from fpq_plugin.integrations.cuda_graphs import (
    GraphedForward,
    disable_cuda_graphs,
    enable_cuda_graphs,
    graphed_forward,
)
from fpq_plugin.models.unet_configs import build_unet, example_unet_inputs

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="CUDA graphs need a CUDA GPU (and fpq's kernels triton); CI has none",
)


def _unet(name: str = "tiny", device: str = "cpu", dtype=torch.float32, recipe: str | None = "w8a8"):
    unet = build_unet(name, dtype=dtype, device=device, seed=1)
    if recipe is not None:
        inputs = example_unet_inputs(unet, batch=2, seed=5)
        with torch.no_grad():
            fpq.quantize_(unet, recipe, calibration_fn=lambda m: m(**inputs))
    return unet


def _call(unet, inputs):
    return unet(**inputs, return_dict=False)[0]


# ------------------------------------------------------------------------------------------------------------
# Any machine
# ------------------------------------------------------------------------------------------------------------


def test_enable_is_idempotent_and_disable_restores_the_class_forward() -> None:
    unet = _unet(recipe=None)
    graphed = enable_cuda_graphs(unet)
    assert isinstance(unet.forward, GraphedForward)
    assert enable_cuda_graphs(unet) is graphed and graphed_forward(unet) is graphed
    assert disable_cuda_graphs(unet) is True
    assert "forward" not in unet.__dict__ and graphed_forward(unet) is None
    assert disable_cuda_graphs(unet) is False


def test_on_the_cpu_the_wrapper_returns_the_eager_output(monkeypatch) -> None:
    unet = _unet(recipe="w8a8")
    inputs = example_unet_inputs(unet, batch=2, seed=2)
    with torch.no_grad():
        want = _call(unet, inputs)
        enable_cuda_graphs(unet)
        got = _call(unet, inputs)
    assert torch.equal(got, want)
    assert graphed_forward(unet).stats["eager"] == 1 and graphed_forward(unet).num_graphs == 0


def test_a_python_number_timestep_is_passed_as_a_tensor_of_diffusers_dtype() -> None:
    seen = []
    module = torch.nn.Linear(2, 2)
    graphed = GraphedForward(module, lambda sample, timestep: seen.append(timestep))
    graphed(torch.zeros(1), 7)
    graphed(torch.zeros(1), timestep=0.5)
    graphed(torch.zeros(1), torch.tensor(3))
    assert [(t.dtype, t.item()) for t in seen] == [(torch.int64, 7), (torch.float64, 0.5), (torch.int64, 3)]


def test_a_deep_copy_gets_its_own_empty_wrapper() -> None:
    unet = _unet(recipe=None)
    enable_cuda_graphs(unet, max_graphs=2)
    twin = copy.deepcopy(unet)
    assert graphed_forward(twin) is not graphed_forward(unet)
    assert graphed_forward(twin).module is twin and graphed_forward(twin).max_graphs == 2


@pytest.mark.parametrize("inference", [False, True], ids=["plain", "inference-mode tensors"])
def test_the_weight_check_sees_replaced_rewritten_and_moved_weights(inference) -> None:
    """The per-call check behind "a weight change drops the graphs", on the CPU: a replaced Parameter and a device
    mismatch always show; an in-place write shows through the version counter, which inference tensors (ComfyUI
    builds its models under inference mode) do not have."""
    with torch.inference_mode(inference):
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4, bias=False))
    graphed = GraphedForward(net, net.forward)
    cpu = torch.device("cpu")
    first = graphed._weight_addresses(cpu)
    assert first is not None and graphed._weight_addresses(cpu) == first
    assert graphed._weight_addresses(torch.device("meta")) is None  # same tensors, another device: not cached
    net[0].weight = torch.nn.Parameter(torch.zeros(4, 4))
    replaced = graphed._weight_addresses(cpu)
    assert replaced != first
    with torch.no_grad():
        net[0].weight.add_(1)
    assert graphed._weight_addresses(cpu) != replaced


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="max_graphs"):
        GraphedForward(torch.nn.Linear(1, 1), print, max_graphs=0)


# ------------------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fpq_unet():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return _unet("tiny", device="cuda", dtype=torch.bfloat16, recipe="w8a8")


@needs_cuda
@pytest.mark.gpu
def test_replays_equal_the_eager_forward_bit_for_bit(fpq_unet, caplog) -> None:
    unet = fpq_unet
    disable_cuda_graphs(unet)
    with torch.no_grad():
        runs = [example_unet_inputs(unet, batch=2, seed=s) for s in range(4)]
        want = [_call(unet, r) for r in runs]
        graphed = enable_cuda_graphs(unet)
        with caplog.at_level(logging.INFO, logger="fpq_plugin.integrations.cuda_graphs"):
            got = [_call(unet, r) for r in runs]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    # one capture, logged once with the batch's latent shape (ComfyUI's server test looks for this line)
    captures = [r.getMessage() for r in caplog.records if "captured the forward" in r.getMessage()]
    assert len(captures) == 1 and "(2, 4," in captures[0], captures
    assert graphed.stats["capture"] == 1 and graphed.stats["replay"] == 4 and graphed.stats["eager"] == 0
    # the outputs are copies: a later replay did not overwrite an earlier result
    assert len({g.data_ptr() for g in got}) == 4
    disable_cuda_graphs(unet)


class _PoppingControlUNet(torch.nn.Module):
    """A UNet fed ControlNet residuals the way ComfyUI's UNetModel takes them: popped off the lists of a dict it is
    handed (diffusers' UNet takes them as tuples), so an eager call empties its argument's lists."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, control):
        down = [control["input"].pop() for _ in range(len(control["input"]))][::-1]
        return self.unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=tuple(down),
                         mid_block_additional_residual=control["middle"].pop(), return_dict=False)[0]


def _residual_shapes(unet, inputs):
    """Shapes of the down-block skip tensors and the mid-block output, which ControlNet residuals match."""
    shapes = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, a, out: shapes.append(out.shape))]
    for block in unet.down_blocks:
        hooks.append(block.register_forward_hook(lambda m, a, out: shapes.extend(r.shape for r in out[1])))
    hooks.append(unet.mid_block.register_forward_hook(lambda m, a, out: shapes.append(out.shape)))
    with torch.no_grad():
        _call(unet, inputs)
    for h in hooks:
        h.remove()
    return shapes[:-1], shapes[-1]


@needs_cuda
@pytest.mark.gpu
def test_a_forward_that_consumes_its_argument_lists_captures_and_replays_exactly(fpq_unet) -> None:
    """Each warm-up and the capture get fresh argument containers: before, the first warm-up's pops left the
    second with empty lists, so the capture failed and ComfyUI's ControlNet calls could not be graphed."""
    unet = fpq_unet
    disable_cuda_graphs(unet)
    model = _PoppingControlUNet(unet).eval()
    base = example_unet_inputs(unet, batch=2, seed=0)
    down_shapes, mid_shape = _residual_shapes(unet, base)
    g = torch.Generator(device="cuda").manual_seed(0)

    def step(seed):
        inp = example_unet_inputs(unet, batch=2, seed=seed)
        res = [torch.randn(s, generator=g, device="cuda", dtype=torch.bfloat16) for s in down_shapes]
        mid = torch.randn(mid_shape, generator=g, device="cuda", dtype=torch.bfloat16)
        return inp, res, mid

    def control(res, mid):
        return {"input": list(res), "middle": [mid], "output": []}

    with torch.no_grad():
        steps = [step(s) for s in range(3)]
        want = [model(i["sample"], i["timestep"], i["encoder_hidden_states"], control(r, m)) for i, r, m in steps]
        no_control = model(steps[0][0]["sample"], steps[0][0]["timestep"], steps[0][0]["encoder_hidden_states"],
                           control([torch.zeros_like(t) for t in steps[0][1]], torch.zeros_like(steps[0][2])))
        graphed = enable_cuda_graphs(model)
        got = [model(i["sample"], i["timestep"], i["encoder_hidden_states"], control(r, m)) for i, r, m in steps]
    disable_cuda_graphs(model)
    assert graphed.stats["failed"] == 0 and graphed.stats["capture"] == 1 and graphed.stats["replay"] == 3, \
        graphed.stats
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(got[0], no_control)  # the residuals reached the captured graph


@needs_cuda
@pytest.mark.gpu
def test_a_new_shape_captures_again_and_old_graphs_are_evicted(fpq_unet) -> None:
    unet = fpq_unet
    graphed = enable_cuda_graphs(unet, max_graphs=2)
    try:
        with torch.no_grad():
            for batch in (1, 2, 1, 3, 2):
                inputs = example_unet_inputs(unet, batch=batch, seed=batch)
                got = _call(unet, inputs)
                eager = graphed.forward(**inputs, return_dict=False)[0]
                assert torch.equal(got, eager), batch
        # batch 1, 2 captured; 1 replayed; 3 evicts 2; 2 evicts 1
        assert graphed.stats["capture"] == 4 and graphed.stats["replay"] == 5 and graphed.stats["evicted"] == 2
        assert graphed.num_graphs == 2
    finally:
        disable_cuda_graphs(unet)


@needs_cuda
@pytest.mark.gpu
def test_replaced_or_rewritten_weights_drop_the_graphs() -> None:
    unet = _unet("tiny", device="cuda", dtype=torch.bfloat16, recipe=None)
    graphed = enable_cuda_graphs(unet)
    inputs = example_unet_inputs(unet, batch=2, seed=0)
    with torch.no_grad():
        _call(unet, inputs)
        conv = unet.conv_in
        conv.weight = torch.nn.Parameter(conv.weight * 2)  # replaced (as LoRA patching does)
        got = _call(unet, inputs)
        assert torch.equal(got, graphed.forward(**inputs, return_dict=False)[0])
        unet.conv_out.weight.mul_(0.5)  # written in place (as load_state_dict does)
        got = _call(unet, inputs)
        assert torch.equal(got, graphed.forward(**inputs, return_dict=False)[0])
    assert graphed.stats["capture"] == 3


@needs_cuda
@pytest.mark.gpu
def test_autograd_training_and_offloaded_weights_run_eagerly(fpq_unet, caplog) -> None:
    unet = fpq_unet
    graphed = enable_cuda_graphs(unet)
    inputs = example_unet_inputs(unet, batch=2, seed=0)
    try:
        with caplog.at_level(logging.INFO, logger="fpq_plugin.integrations.cuda_graphs"):
            _call(unet, inputs)  # grad mode on
            unet.train()
            with torch.no_grad():
                _call(unet, inputs)
            unet.eval()
        assert graphed.stats["eager"] == 2 and graphed.stats["capture"] == 0
        messages = " ".join(r.getMessage() for r in caplog.records)
        assert "autograd is on" in messages and "training mode" in messages
    finally:
        disable_cuda_graphs(unet)


@needs_cuda
@pytest.mark.gpu
def test_sdxl_added_conditioning_and_number_timesteps_replay_one_graph() -> None:
    unet = _unet("tiny-xl", device="cuda", dtype=torch.bfloat16, recipe="w8a8")
    base = example_unet_inputs(unet, batch=2, seed=0)
    graphed = enable_cuda_graphs(unet)
    with torch.inference_mode():
        for step, t in enumerate((999, 500, 1)):
            inputs = {**base, "timestep": t, "sample": base["sample"] * (step + 1)}
            got = _call(unet, inputs)
            assert torch.equal(got, graphed.forward(**inputs, return_dict=False)[0]), t
    assert graphed.stats["capture"] == 1 and graphed.stats["replay"] == 3


@needs_cuda
@pytest.mark.gpu
def test_fpquant_pipeline_replays_graphs_and_makes_the_same_images(tmp_path) -> None:
    from fpq_plugin.integrations.diffusers_pipeline import FPQuantPipeline
    from fpq_plugin.method import MethodConfig
    from fpq_plugin.models.tiny_pipeline import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / "tiny-sd15", "sd15", seed=0)
    quick = MethodConfig("quick-test", rounding_iters=20, search_rows=256, weight_shrink_factors=(1.0, 0.8))
    pipe = FPQuantPipeline.from_pretrained(
        folder,
        "w8a8",
        method=quick,
        num_prompts=2,
        num_inference_steps=4,
        keep_steps=2,
        cache_dir=tmp_path / "cache",
        device="cuda",
    )
    graphed = graphed_forward(pipe.unet)
    assert pipe.fpq_info["cuda_graphs"] is True and graphed is not None

    def images():
        return pipe(
            ["a blue circle"], num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images

    with_graphs = images()
    assert graphed.stats["capture"] == 1 and graphed.stats["replay"] == 5
    disable_cuda_graphs(pipe.unet)
    assert (images() == with_graphs).all()


_ASYNC_ALLOCATOR_SCRIPT = """
import logging, sys, torch
sys.path.insert(0, sys.argv[1])
from fpq_plugin.integrations import cuda_graphs
from fpq_plugin.kernels import backend
from fpq_plugin.models.unet_configs import example_unet_inputs
from integrations.test_cuda_graphs import _call, _unet

logging.basicConfig(level=logging.INFO, stream=sys.stdout)
assert torch.cuda.get_allocator_backend() == "cudaMallocAsync"
mode = sys.argv[2]
if mode == "off":
    cuda_graphs.CAPTURE_UNDER_ASYNC_ALLOCATOR = False
if mode == "binder":  # the opt-in FP8 implicit-GEMM conv launches through Triton's binder on every call
    backend.FP8_CONV_METHOD = "implicit_gemm"
unet = _unet("tiny", device="cuda", dtype=torch.bfloat16, recipe="w8a8")
inputs = example_unet_inputs(unet, batch=2, seed=0)
with torch.no_grad():
    if mode == "fresh":  # the graphed call is the model's first (ComfyUI's case): no eager call before it
        graphed = cuda_graphs.enable_cuda_graphs(unet)
        got = [_call(unet, inputs) for _ in range(3)]
        want = graphed.forward(**inputs, return_dict=False)[0]
    else:
        want = unet(**inputs, return_dict=False)[0]
        graphed = cuda_graphs.enable_cuda_graphs(unet)
        got = [_call(unet, inputs) for _ in range(3)]
    other = example_unet_inputs(unet, batch=2, seed=1)  # the replay reads new inputs
    got_other, want_other = _call(unet, other), graphed.forward(**other, return_dict=False)[0]
assert all(torch.equal(g, want) for g in got)
assert torch.equal(got_other, want_other)
print("STATS", dict(graphed.stats))
"""


def _run_under_async_allocator(mode: str) -> str:
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), str(tests), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _ASYNC_ALLOCATOR_SCRIPT, str(tests), mode], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]  # a failed capture under this allocator aborts the process
    return out


@needs_cuda
@pytest.mark.gpu
def test_the_async_allocator_captures_with_int_pointer_launches() -> None:
    """Under cudaMallocAsync (ComfyUI's default) fpq's cached launches pass plain-int pointers inside the capture
    (Triton's pointer check fails on memory allocated there, and the failed capture aborts the process)."""
    out = _run_under_async_allocator("capture")
    assert "STATS {'capture': 1, 'replay': 4}" in out, out[-2000:]


@needs_cuda
@pytest.mark.gpu
def test_the_async_allocator_captures_a_model_whose_first_call_is_the_graphed_one() -> None:
    """A fresh model launches some kernels for the first time in its second call (producers that write their
    consumer's fp8 input once the consumer has picked its backend): the capture warms up again instead of staying
    eager (ComfyUI 0.8.0 on an H100 logged one binder launch and ran that shape eagerly before)."""
    out = _run_under_async_allocator("fresh")
    assert "STATS {'capture': 1, 'replay': 4}" in out, out[-2000:]
    assert "went through Triton's Python launcher" not in out, out[-2000:]


@needs_cuda
@pytest.mark.gpu
def test_the_async_allocator_stays_eager_when_a_kernel_goes_through_tritons_binder() -> None:
    """A Triton launch through Triton's Python binder in the last warm-up means the capture would fail and abort:
    that input shape runs eagerly, said once."""
    out = _run_under_async_allocator("binder")
    assert "STATS {'eager': 4}" in out, out[-2000:]
    assert out.count("went through Triton's Python launcher") == 1, out[-2000:]


@needs_cuda
@pytest.mark.gpu
def test_the_async_allocator_capture_can_be_switched_off() -> None:
    out = _run_under_async_allocator("off")
    assert "STATS {'eager': 4}" in out, out[-2000:]
    assert out.count("CUDA graphs off: PyTorch's cudaMallocAsync allocator is on") == 1, out[-2000:]
