"""UNet forward latency, memory and time breakdown: bf16 vs fpq W8A8 / W4A8 / W4A16 (vs torchao float8) on a GPU.

Random-weight UNets with the real SD1.5 (batch 2, 512x512 -> 64x64 latent) and SDXL (batch 1 and 2, 1024x1024 ->
128x128 latent) configs (weights do not change speed; layer shapes do). In one process, for each model:

* floors: bf16 and fp8 (``torch._scaled_mm``) matmul TFLOP/s at 8192^3 and device-to-device copy bandwidth;
* variants: ``bf16`` (eager), ``fpq_w8a8`` (backend auto: FP8 Linear through cuBLAS, convs through the decode path),
  ``fpq_w8a8_fused`` (same model, Linear through the fused-cast Triton kernel), ``fpq_w8a8_igemm`` (same model,
  Conv2d through the FP8 implicit-GEMM kernel), ``bf16_cl`` / ``fpq_w8a8_igemm_cl`` (channels-last), ``fpq_w4a8``,
  ``fpq_w4a16``
  (RTN ``quantize_`` with absmax activation scales from one observed forward), the same models with one switch
  flipped (``<fpq variant>_fp32acc``: cuBLAS fp8 GEMMs without fast accumulation; ``<fpq variant>_plain_geglu``:
  diffusers' GEGLU instead of fpq's one-pass kernel; ``_plain_gn``: PyTorch's GroupNorm; ``_unfused``: both;
  ``_no_geglu_cast`` (the GEGLU kernel does not write the next Linear's fp8 input), ``_plain_ln`` (PyTorch's
  LayerNorm on the transformer blocks), ``_ln_no_cast`` (fpq's LayerNorm kernel without its consumer's fp8 cast),
  ``_two_launch`` (W4A8's activation cast and weight decode in two kernels), ``_before_ln`` (all four: the defaults
  before 2026-12-07)),
  ``bf16_fused`` (the bf16 model with fpq's GEGLU, GroupNorm and LayerNorm kernels: the part of fpq's gain a float
  model could have too) and ``torchao_fp8_row``
  (torchao float8 dynamic activation, per-row scales, Linear only) when torchao imports;
* eager latency: median of CUDA-event timings, variants interleaved round-robin (ratios inside one process; the VM's
  host speed drifts between processes);
* graph latency: the same forward captured in a CUDA graph and replayed (device time without launch gaps);
* compiled latency (``--compile-only``): ``torch.compile`` (``--compile-mode``: default, or ``reduce-overhead``, which
  replays CUDA graphs and so removes the launch cost; one mode per output file), for ``--compile-variants``;
* weight memory (parameters + buffers; torchao subclass tensors by their inner tensors) and call peak (weights +
  the most memory the call allocates on top);
* breakdown: device time per layer type from ``torch.profiler`` (Linear, Conv2d, attention core, everything else).

Writes JSON (merged into ``--out`` if it exists, so several processes can fill one file) and prints a table last.
Example (the command of benchmarks/results/unet_h100.json):

    python benchmarks/bench_unet.py --out benchmarks/results/unet_h100.json
    python benchmarks/bench_unet.py --out benchmarks/results/unet_h100.json --compile-only --models sd15:2,sdxl:2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

from pathlib import Path

import torch
import torch.nn.functional as F

# Run as a script from anywhere: the repository root (fpq_plugin) goes on the path, as in the other benchmarks.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Floors
# ----------------------------------------------------------------------------------------------------------------


def _time_ms(fn, reps=20, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def floors(dev):
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = _time_ms(lambda: a @ b)
    out = {"bf16_matmul_tflops": round(2 * n**3 / t / 1e9, 1)}
    a8 = a.to(torch.float8_e4m3fn)
    b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()
    one = torch.ones((), device=dev)
    t = _time_ms(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    out["fp8_matmul_tflops"] = round(2 * n**3 / t / 1e9, 1)
    src = torch.empty(2**30, dtype=torch.uint8, device=dev)
    src.random_(0, 255)
    dst = torch.empty_like(src)
    t = _time_ms(lambda: dst.copy_(src))
    out["copy_TBps_read_plus_write"] = round(2 * src.numel() / t / 1e9, 2)
    del a, b, a8, b8, src, dst
    torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def build(name, dev, seed=0):
    """The bf16 UNet with uniform(+-1/sqrt(fan_in)) weights drawn on the GPU (PyTorch's default scale; the CPU init
    of an SDXL-size model takes minutes on the test VM)."""
    from fpq_plugin.models.unet_configs import build_unet

    unet = build_unet(name, meta=True, dtype=torch.bfloat16)
    unet = torch.nn.Module.to_empty(unet, device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for pname, p in unet.named_parameters():
            if p.dim() >= 2:
                bound = 1.0 / math.sqrt(p[0].numel())
                p.uniform_(-bound, bound, generator=g)
            elif pname.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return unet.eval()


def tensor_bytes(t):
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    if isinstance(t, torch.nn.Parameter) and type(t.data) is not torch.Tensor:
        return tensor_bytes(t.data)
    return t.numel() * t.element_size()


def weight_bytes(model):
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        n += tensor_bytes(t)
    return n


def input_ranges(model, inp):
    from fpq_plugin.api import iter_quantizable, observe_input_ranges

    targets, _ = iter_quantizable(model)
    with torch.no_grad(), observe_input_ranges(dict(targets)) as ranges:
        model(**inp)
    return dict(ranges)


def quantized_copy(base, recipe, ranges):
    from fpq_plugin.api import quantize_
    from fpq_plugin.recipes import get_recipe

    r = get_recipe(recipe)
    if r.weight_bits == 4:
        r = r.replace(weight_scale_method="absmax")  # speed does not depend on the clipping search; saves minutes
    m = copy.deepcopy(base)
    rep = quantize_(m, r, input_ranges=ranges if r.quantizes_activations else None)
    return m, rep


def torchao_copy(base):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    m = copy.deepcopy(base)
    # set_inductor_config=False: by default torchao switches on Inductor's coordinate-descent tuning for the whole
    # process, which then autotunes every fused kernel of every compiled variant at run time (bf16 and fpq too):
    # an SD1.5 compile did not finish in 5 minutes on an H200 that way. Every variant compiles with the same defaults.
    quantize_(m, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
    return m


# Variant-name suffixes that run an fpq model with one switch flipped (same model object, same process):
# ``fpq_w8a8_fp32acc`` = cuBLAS fp8 GEMMs without fast accumulation, ``fpq_w8a8_plain_geglu`` = diffusers' own GEGLU,
# ``fpq_w8a8_plain_gn`` = PyTorch's GroupNorm, ``fpq_w8a8_unfused`` = both, ``fpq_w8a8_own_casts`` = every layer casts
# its input itself (no cast shared between to_q/to_k/to_v), ``_no_geglu_cast`` = ff.net.2 casts its input itself,
# ``_plain_ln`` = PyTorch's LayerNorm on the transformer blocks' norms, ``_ln_no_cast`` = fpq's LayerNorm kernel
# without its consumer's fp8 cast, ``fpq_w4a8_two_launch`` = a W4A8 Linear's activation cast and weight decode in
# two kernels, ``_before_ln`` = all four (the defaults until these were measured on 2026-12-07; earlier JSONs name
# the opposite variants ``_geglu_cast``, ``_fused_ln``, ``_ln_cast``, ``_one_launch``, ``_new_fusions``).
VARIANT_SWITCHES = {"_fp32acc": {"fast_accum": False}, "_fastacc": {"fast_accum": True},
                    "_plain_geglu": {"fused_geglu": False}, "_plain_gn": {"fused_group_norm": False},
                    "_unfused": {"fused_geglu": False, "fused_group_norm": False},
                    "_own_casts": {"share_casts": False}, "_no_geglu_cast": {"geglu_cast": False},
                    "_plain_ln": {"fused_layer_norm": False},
                    "_ln_no_cast": {"ln_cast": False},
                    "_two_launch": {"merge_cast_decode": False},
                    "_before_ln": {"geglu_cast": False, "fused_layer_norm": False, "merge_cast_decode": False}}
SWITCH_NAMES = {k for switch in VARIANT_SWITCHES.values() for k in switch}


def _switch_targets() -> dict:
    """Variant switch name -> (module, attribute) of the module-wide switch it sets."""
    from fpq_plugin.kernels import backend as kb
    from fpq_plugin.nn import fused_geglu as fg
    from fpq_plugin.nn import fused_group_norm as fgn
    from fpq_plugin.nn import fused_layer_norm as fln

    return {"fast_accum": (kb, "FP8_FAST_ACCUM"), "share_casts": (kb, "SHARE_ACTIVATION_CASTS"),
            "merge_cast_decode": (kb, "MERGE_CAST_DECODE"), "fused_geglu": (fg, "ENABLED"),
            "geglu_cast": (fg, "CAST_FOR_NEXT_LINEAR"), "fused_group_norm": (fgn, "ENABLED"),
            "fused_layer_norm": (fln, "ENABLED"), "ln_cast": (fln, "CAST_FOR_CONSUMER")}


@contextlib.contextmanager
def fp8_method(method, conv_method="decode", **switches):
    """Run with the fp8 backend's Linear/conv methods and the named switches (None: leave as is) set."""
    from fpq_plugin.kernels import backend as kb

    targets = _switch_targets()
    settings = [(kb, "FP8_LINEAR_METHOD", method), (kb, "FP8_CONV_METHOD", conv_method)]
    settings += [(*targets[k], v) for k, v in switches.items() if v is not None]
    old = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in settings]
    for mod, attr, value in settings:
        setattr(mod, attr, value)
    try:
        yield
    finally:
        for mod, attr, value in old:
            setattr(mod, attr, value)


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------


def call(variant, inp):
    if variant.get("channels_last"):  # the latent arrives channels-last; every conv output then stays so
        inp = dict(inp, sample=inp["sample"].contiguous(memory_format=torch.channels_last))
    switches = {k: v for k, v in variant.items() if k in SWITCH_NAMES}
    with torch.no_grad(), fp8_method(variant.get("method", "auto"), variant.get("conv_method", "decode"), **switches):
        return variant["model"](**inp, return_dict=False)[0]


def eager_round_robin(variants, inp, reps, warm):
    for v in variants:
        for _ in range(warm):
            call(v, inp)
    torch.cuda.synchronize()
    times = {v["name"]: [] for v in variants}
    for r in range(reps):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            call(v, inp)
            b.record()
            b.synchronize()
            times[v["name"]].append(a.elapsed_time(b))
    return {k: statistics.median(t) for k, t in times.items()}, times


def graph_time(v, inp, reps):
    """Capture one forward in a CUDA graph (after eager warm-up on a side stream) and time its replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            call(v, inp)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = call(v, inp)
    t = _time_ms(g.replay, reps=reps, warm=2)
    del g, out
    return t


def front_door_time(v, inp, reps):
    """What FPQuantPipeline / the ComfyUI node run: ``enable_cuda_graphs`` on the model, then ordinary calls
    (input copies into the captured buffers, replay, output copy). Per call with a sync (as ``eager_ms``) and back to
    back (10 calls, as a denoising loop issues them); the first call (warm-up + capture) is timed on its own, and
    the replay is checked bit for bit against the eager output."""
    from fpq_plugin.integrations.cuda_graphs import disable_cuda_graphs, enable_cuda_graphs

    want = call(v, inp)
    graphed = enable_cuda_graphs(v["model"])
    try:
        torch.cuda.synchronize()
        t = time.perf_counter()
        first = call(v, inp)
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t
        per_call = _time_ms(lambda: call(v, inp), reps=reps, warm=2)
        b2b = _time_ms(lambda: [call(v, inp) for _ in range(10)], reps=5, warm=1) / 10
        return {"front_door_ms": round(per_call, 3), "front_door_ms_back_to_back": round(b2b, 3),
                "front_door_first_call_s": round(first_s, 3),
                "front_door_equals_eager": bool(torch.equal(first, want)),
                "front_door_stats": dict(graphed.stats)}
    finally:
        disable_cuda_graphs(v["model"])
        del want
        torch.cuda.empty_cache()


def peak_call(v, inp):
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = call(v, inp)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    del out
    return extra


def breakdown(v, inp):
    """Device time (ms) per layer type in one eager forward: ranges opened/closed by module hooks (Linear, Conv2d)
    and around scaled_dot_product_attention; 'other' = every other kernel (norms, elementwise, copies)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from fpq_plugin.nn import QConv2d, QLinear

    kinds = {torch.nn.Linear: "linear", QLinear: "linear", torch.nn.Conv2d: "conv", QConv2d: "conv"}
    handles, stack = [], []

    def pre(name):
        def f(_m, _a):
            rf = record_function(f"bench::{name}")
            rf.__enter__()
            stack.append(rf)
        return f

    def post(_m, _a, _o):
        stack.pop().__exit__(None, None, None)

    for m in v["model"].modules():
        kind = next((k for t, k in kinds.items() if type(m) is t or isinstance(m, t)), None)
        if kind is not None:
            handles.append(m.register_forward_pre_hook(pre(kind)))
            handles.append(m.register_forward_hook(post))
    orig = F.scaled_dot_product_attention

    def sdpa(*a, **kw):
        with record_function("bench::attention"):
            return orig(*a, **kw)

    F.scaled_dot_product_attention = sdpa
    try:
        call(v, inp)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            call(v, inp)
            torch.cuda.synchronize()
    finally:
        F.scaled_dot_product_attention = orig
        for h in handles:
            h.remove()
    evs = prof.events()
    cpu = torch.autograd.DeviceType.CPU
    # Kernels are attributed to the CPU op that launched them (correlation ids); a CPU range's device_time_total
    # sums the kernels of the ops inside it. (GPU-side annotation spans would include launch gaps: not used.)
    kern = [k for e in evs if e.device_type == cpu for k in e.kernels]
    # Triton kernels launched directly (cached launches, no aten op) are attached to no CPU op (seen in the
    # committed run: they were missing from the totals); count them from the device-side events instead.
    attached = {k.name for k in kern}
    orphans = [e for e in evs if e.device_type != cpu and not e.name.startswith("bench::")
               and e.name not in attached and not e.name.startswith(("Memcpy", "Memset"))]
    total = (sum(k.duration for k in kern) + sum(e.time_range.elapsed_us() for e in orphans)) / 1e3
    out = {"total_ms": round(total, 3), "kernels": len(kern) + len(orphans),
           "unattributed_ms": round(sum(e.time_range.elapsed_us() for e in orphans) / 1e3, 3)}
    for kind in ("linear", "conv", "attention"):
        out[f"{kind}_ms"] = round(
            sum(e.device_time_total for e in evs if e.device_type == cpu and e.name == f"bench::{kind}") / 1e3, 3)
    out["other_ms"] = round(total - out["linear_ms"] - out["conv_ms"] - out["attention_ms"], 3)
    by_name: dict[str, list] = {}
    for name, us in [(k.name, k.duration) for k in kern] + [(e.name, e.time_range.elapsed_us()) for e in orphans]:
        r = by_name.setdefault(name[:90], [0.0, 0])
        r[0] += us / 1e3
        r[1] += 1
    out["top_kernels"] = [[n, round(t, 3), c] for n, (t, c) in sorted(by_name.items(), key=lambda i: -i[1][0])[:20]]
    return out


def _kernel_family(name: str) -> str:
    n = name.lower()
    if n.startswith("triton"):
        return "triton (Inductor-fused pointwise/norm/cast)"
    if "flash" in n or "fmha" in n or "attention" in n:
        return "attention core"
    if "conv" in n or "cudnn" in n or "implicit_convolve" in n or "xmma_fprop" in n or "fprop" in n:
        return "convolution"
    if "gemm" in n or "cutlass" in n or "sm90" in n or "xmma" in n or "cublas" in n:
        return "gemm"
    return "other"


def compiled_profile(cv, inp):
    """Device time of one compiled forward by kernel family, and the costliest kernels: where a compiled variant's
    time goes (kernels come from device-side events, so Inductor's direct launches are counted)."""
    from torch.profiler import ProfilerActivity, profile

    call(cv, inp)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call(cv, inp)
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type != torch.autograd.DeviceType.CPU
           and not e.name.startswith(("Memcpy", "Memset"))]
    fam: dict[str, list] = {}
    by_name: dict[str, list] = {}
    for e in evs:
        us = e.time_range.elapsed_us()
        for d, k in ((fam, _kernel_family(e.name)), (by_name, e.name[:90])):
            r = d.setdefault(k, [0.0, 0])
            r[0] += us / 1e3
            r[1] += 1
    return {"total_ms": round(sum(r[0] for r in fam.values()), 3), "kernels": len(evs),
            "families": {k: [round(t, 3), c] for k, (t, c) in sorted(fam.items(), key=lambda i: -i[1][0])},
            "top_kernels": [[n, round(t, 3), c] for n, (t, c) in
                            sorted(by_name.items(), key=lambda i: -i[1][0])[:16]]}


def rel_err(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------

LATENT = {"sd15": 64, "sdxl": 128}


def parse_models(s):
    out = {}
    for item in s.split(","):
        name, b = item.split(":")
        out.setdefault(name, []).append(int(b))
    return out


def save(path, res):
    old = {}
    if os.path.exists(path):
        with open(path) as fh:
            old = json.load(fh)
    for k, v in res.items():
        if isinstance(v, dict) and isinstance(old.get(k), dict):
            old[k] = {**old[k], **v}
            for kk, vv in v.items():
                if isinstance(vv, dict) and isinstance(old[k].get(kk), dict):
                    old[k][kk] = {**old[k][kk], **vv}
        else:
            old[k] = v
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(old, fh, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/unet_h100.json")
    ap.add_argument("--models", default="sd15:2,sdxl:1,sdxl:2", help="name:batch,... (sd15, sdxl)")
    ap.add_argument("--variants", default="bf16,fpq_w8a8,fpq_w8a8_fused,fpq_w4a8,fpq_w4a16,torchao_fp8_row")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--front-door", action="store_true",
                    help="also time calls through enable_cuda_graphs (what FPQuantPipeline and the node run)")
    ap.add_argument("--compile-only", action="store_true", help="only the torch.compile measurements")
    ap.add_argument("--compile-variants", default="bf16,fpq_w8a8,torchao_fp8_row")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode: default, reduce-overhead (CUDA graphs: no launch cost), max-autotune...")
    ap.add_argument("--compile-profile", action="store_true",
                    help="profile one compiled forward per variant: device time by kernel family, top kernels")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip further compiles after this many seconds")
    args = ap.parse_args()

    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    res = {
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "results": {},
    }
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import torchao

        res["torchao"] = torchao.__version__
    except Exception as e:  # noqa: BLE001 - the peer is optional
        res["torchao"] = f"unavailable: {e!r}"[:200]
    if not args.compile_only:
        res["floors"] = floors(dev)
        log("floors", res["floors"])
    save(args.out, res)

    wanted = args.variants.split(",")
    for name, batches in parse_models(args.models).items():
        log(f"building {name}")
        base = build(name, dev)
        lat = LATENT[name]
        from fpq_plugin.models.unet_configs import example_unet_inputs

        inputs = {b: example_unet_inputs(base, batch=b, height=lat, width=lat) for b in batches}
        ranges = input_ranges(base, inputs[max(batches)])
        variants = [{"name": "bf16", "model": base}]
        info = {"bf16": {"weight_MiB": round(weight_bytes(base) / 2**20, 1)}}
        if "bf16_cl" in wanted:  # cuDNN's fastest bf16 layout: channels-last weights and activations
            variants.append({"name": "bf16_cl", "model": copy.deepcopy(base).to(memory_format=torch.channels_last),
                             "channels_last": True})
            info["bf16_cl"] = dict(info["bf16"])
        if "bf16_fused" in wanted:  # the bf16 model with fpq's GEGLU, GroupNorm (and LayerNorm) kernels: the part
            from fpq_plugin.nn.fused_geglu import fuse_geglu  # of fpq's gain that is those kernels, not quantization
            from fpq_plugin.nn.fused_group_norm import fuse_group_norm
            from fpq_plugin.nn.fused_layer_norm import fuse_block_norm_for

            m = copy.deepcopy(base)
            for mod_name, mod in list(m.named_modules()):
                fuse_geglu(mod)
                fuse_group_norm(mod)
                fuse_block_norm_for(m, mod_name)
            variants.append({"name": "bf16_fused", "model": m})
            info["bf16_fused"] = dict(info["bf16"])
        need = set(wanted) | (set(args.compile_variants.split(",")) if args.compile_only else set())
        for vname, recipe in (("fpq_w8a8", "w8a8"), ("fpq_w4a8", "w4a8"), ("fpq_w4a16", "w4a16")):
            shares_w8a8 = need & {"fpq_w8a8_fused", "fpq_w8a8_igemm", "fpq_w8a8_igemm_cl"}
            if vname not in need and not any(f"{vname}{sfx}" in need for sfx in VARIANT_SWITCHES) and \
                    not (vname == "fpq_w8a8" and shares_w8a8):
                continue
            t = time.time()
            try:
                m, rep = quantized_copy(base, recipe, ranges)
            except Exception as e:  # noqa: BLE001 - record and go on with the other variants
                traceback.print_exc()
                info[vname] = {"error": repr(e)[:300]}
                continue
            info[vname] = {"weight_MiB": round(weight_bytes(m) / 2**20, 1), "quantize_s": round(time.time() - t, 1),
                           "formats": rep.format_counts()}
            if vname in need:
                variants.append({"name": vname, "model": m})
            for suffix, switch in VARIANT_SWITCHES.items():  # same model, one backend switch flipped
                if f"{vname}{suffix}" in need:
                    variants.append(dict(switch, name=f"{vname}{suffix}", model=m))
                    info[f"{vname}{suffix}"] = dict(info[vname])
            if vname == "fpq_w8a8" and "fpq_w8a8_fused" in need:
                variants.append({"name": "fpq_w8a8_fused", "model": m, "method": "fused"})
                info["fpq_w8a8_fused"] = dict(info[vname])
            for cl in ("", "_cl"):  # same model, convs on the FP8 implicit GEMM (NCHW or channels-last latent)
                if vname == "fpq_w8a8" and f"fpq_w8a8_igemm{cl}" in need:
                    variants.append({"name": f"fpq_w8a8_igemm{cl}", "model": m, "conv_method": "implicit_gemm",
                                     "channels_last": bool(cl)})
                    info[f"fpq_w8a8_igemm{cl}"] = dict(info[vname])
            log(f"{name} {vname} quantized in {time.time() - t:.1f}s, {info[vname]['weight_MiB']} MiB")
        if "torchao_fp8_row" in need:
            try:
                m = torchao_copy(base)
                variants.append({"name": "torchao_fp8_row", "model": m})
                info["torchao_fp8_row"] = {"weight_MiB": round(weight_bytes(m) / 2**20, 1)}
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                info["torchao_fp8_row"] = {"error": repr(e)[:300]}
        # which backend each fpq layer kind ended up on, and the numerics against the fp32 reference backend
        for b in batches:
            key = f"{name}_b{b}"
            inp = inputs[b]
            out = {"latent": lat, "batch": b, "variants": {}}
            vres = out["variants"]
            for v in variants:
                vres[v["name"]] = dict(info.get(v["name"], {}))
            if not args.compile_only:
                # correctness: every variant runs, finite, error vs bf16 and (fpq) vs the reference backend
                ref_bf16 = call(variants[0], inp)
                for v in variants[1:]:
                    try:
                        y = call(v, inp)
                        vres[v["name"]]["rel_err_vs_bf16"] = round(rel_err(y, ref_bf16), 4)
                        if v["name"].startswith("fpq") and b == min(batches):
                            from fpq_plugin.api import set_backend

                            set_backend(v["model"], "reference")
                            yr = call(v, inp)
                            set_backend(v["model"], "auto")
                            vres[v["name"]]["rel_err_vs_reference_backend"] = round(rel_err(y, yr), 5)
                            del yr
                    except Exception as e:  # noqa: BLE001
                        traceback.print_exc()
                        vres[v["name"]]["error"] = repr(e)[:300]
                del ref_bf16
                ok = [v for v in variants if "error" not in vres[v["name"]]]
                log(f"{key}: eager round robin over {[v['name'] for v in ok]}")
                med, raw = eager_round_robin(ok, inp, args.reps, args.warm)
                for v in ok:
                    vres[v["name"]]["eager_ms"] = round(med[v["name"]], 2)
                    vres[v["name"]]["eager_ms_all"] = [round(t, 2) for t in raw[v["name"]]]
                save(args.out, {"results": {key: out}})  # each stage is saved: a timeout keeps what finished
                for v in ok:
                    try:
                        vres[v["name"]]["peak_MiB"] = round(
                            (weight_bytes(v["model"]) + peak_call(v, inp)) / 2**20, 1)
                    except Exception as e:  # noqa: BLE001
                        vres[v["name"]]["peak_error"] = repr(e)[:200]
                if not args.no_graph:
                    for rnd in range(2):  # two rounds in opposite orders; memory allows one graph at a time
                        for v in ok if rnd == 0 else ok[::-1]:
                            try:
                                t = graph_time(v, inp, reps=max(5, args.reps // 2))
                                vres[v["name"]].setdefault("graph_ms_rounds", []).append(round(t, 3))
                            except Exception as e:  # noqa: BLE001
                                vres[v["name"]]["graph_error"] = repr(e)[:300]
                            torch.cuda.empty_cache()
                    for v in ok:
                        rr = vres[v["name"]].get("graph_ms_rounds")
                        if rr:
                            vres[v["name"]]["graph_ms"] = round(min(rr), 3)
                    log(f"{key}: graphs done")
                    save(args.out, {"results": {key: out}})
                if args.front_door:
                    for v in ok:
                        if v.get("channels_last") or v.get("method", "auto") != "auto" or \
                                any(k in v for k in ("fast_accum", "fused_geglu", "fused_group_norm", "share_casts")):
                            continue  # the front doors run the default methods on the pipeline's NCHW latents
                        try:
                            vres[v["name"]].update(front_door_time(v, inp, reps=args.reps))
                        except Exception as e:  # noqa: BLE001
                            traceback.print_exc()
                            vres[v["name"]]["front_door_error"] = repr(e)[:300]
                    log(f"{key}: front door done")
                    save(args.out, {"results": {key: out}})
                if not args.no_profile:
                    for v in ok:
                        try:
                            vres[v["name"]]["breakdown"] = breakdown(v, inp)
                        except Exception as e:  # noqa: BLE001
                            traceback.print_exc()
                            vres[v["name"]]["breakdown_error"] = repr(e)[:300]
                base_t = vres["bf16"].get("eager_ms")
                base_g = vres["bf16"].get("graph_ms")
                for v in ok:
                    r = vres[v["name"]]
                    if base_t and r.get("eager_ms"):
                        r["speedup_eager_vs_bf16"] = round(base_t / r["eager_ms"], 3)
                    if base_g and r.get("graph_ms"):
                        r["speedup_graph_vs_bf16_graph"] = round(base_g / r["graph_ms"], 3)
                    if base_t and r.get("front_door_ms"):
                        r["speedup_front_door_vs_bf16_eager"] = round(base_t / r["front_door_ms"], 3)
                    if vres["bf16"].get("front_door_ms") and r.get("front_door_ms"):
                        r["speedup_front_door_vs_bf16_front_door"] = round(
                            vres["bf16"]["front_door_ms"] / r["front_door_ms"], 3)
                save(args.out, {"results": {key: out}})
            else:
                cvars = [v for v in variants if v["name"] in args.compile_variants.split(",")]
                for v in cvars:
                    if time.time() - T0 > args.budget_s:
                        vres[v["name"]]["compile_skipped"] = "time budget"
                        continue
                    torch._dynamo.reset()
                    t = time.time()
                    try:
                        call(v, inp)  # one eager call first: it records each layer's backend for the compiled trace
                        torch.cuda.synchronize()
                        mode = None if args.compile_mode == "default" else args.compile_mode
                        cm = torch.compile(v["model"], mode=mode)
                        cv = dict(v, model=cm)
                        call(cv, inp)
                        torch.cuda.synchronize()
                        vres[v["name"]]["compile_s"] = round(time.time() - t, 1)
                        vres[v["name"]]["compile_mode"] = args.compile_mode
                        vres[v["name"]]["inductor_coordinate_descent_tuning"] = bool(
                            torch._inductor.config.coordinate_descent_tuning)
                        vres[v["name"]]["compiled_ms"] = round(
                            _time_ms(lambda cv=cv: call(cv, inp), reps=args.reps, warm=2), 2)
                        # a denoising loop issues the next call before the device finishes: the host's
                        # per-call cost (guards, graph launch) then overlaps the device's work
                        vres[v["name"]]["compiled_ms_back_to_back"] = round(
                            _time_ms(lambda cv=cv: [call(cv, inp) for _ in range(10)], reps=5, warm=1) / 10, 2)
                        vres[v["name"]]["eager_ms_same_process"] = round(
                            _time_ms(lambda v=v: call(v, inp), reps=max(5, args.reps // 2), warm=1), 2)
                        log(f"{key} {v['name']} compiled: {vres[v['name']]['compiled_ms']} ms "
                            f"(compile {vres[v['name']]['compile_s']} s)")
                        if args.compile_profile:
                            vres[v["name"]]["compiled_profile"] = compiled_profile(cv, inp)
                            log(json.dumps(vres[v["name"]]["compiled_profile"]["families"]))
                        del cm, cv
                    except Exception as e:  # noqa: BLE001
                        traceback.print_exc()
                        vres[v["name"]]["compile_error"] = repr(e)[:300]
                    save(args.out, {"results": {key: {"variants": {v["name"]: vres[v["name"]]}}}})
                cb = vres.get("bf16", {}).get("compiled_ms")
                for v in cvars:
                    r = vres[v["name"]]
                    if cb and r.get("compiled_ms"):
                        r["speedup_compiled_vs_bf16_compiled"] = round(cb / r["compiled_ms"], 3)
                    if r.get("compiled_ms") and vres.get("bf16", {}).get("eager_ms_same_process"):
                        r["speedup_compiled_vs_bf16_eager"] = round(
                            vres["bf16"]["eager_ms_same_process"] / r["compiled_ms"], 3)
                save(args.out, {"results": {key: {"variants": {v["name"]: vres[v["name"]] for v in cvars}}}})
        del variants, base
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    print_table(args.out)


def print_table(path):
    with open(path) as fh:
        res = json.load(fh)
    print("\nfloors:", res.get("floors"))
    cols = ("eager_ms", "speedup_eager_vs_bf16", "graph_ms", "speedup_graph_vs_bf16_graph", "front_door_ms",
            "speedup_front_door_vs_bf16_eager", "compiled_ms",
            "speedup_compiled_vs_bf16_compiled", "weight_MiB", "peak_MiB", "rel_err_vs_reference_backend")
    print("config variant " + " ".join(cols))
    for key, r in res.get("results", {}).items():
        for vn, v in r.get("variants", {}).items():
            bd = v.get("breakdown", {})
            print(key, vn, *(v.get(c, "-") for c in cols),
                  "| lin/conv/attn/other ms", bd.get("linear_ms"), bd.get("conv_ms"), bd.get("attention_ms"),
                  bd.get("other_ms"), "kern", bd.get("kernels"),
                  ("ERR " + v["error"][:80]) if "error" in v else "")
    last = list(res.get("results", {}).values())[-1:] if res.get("results") else []
    for r in last:
        for vn in ("bf16", "fpq_w8a8", "fpq_w4a16"):
            bd = r.get("variants", {}).get(vn, {}).get("breakdown", {})
            for name, t, c in bd.get("top_kernels", [])[:7]:
                print(f"  top {vn}: {t:8.3f} ms {c:5d}x {name[:70]}")


if __name__ == "__main__":
    main()
