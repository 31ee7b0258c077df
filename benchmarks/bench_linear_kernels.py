"""Micro-benchmark of the quantized Linear kernels on the UNet Linear shapes (run on a CUDA sm_89+ GPU).

For every distinct Linear shape (M, K, N) of SD1.5 (batch 2, 512x512) and SDXL (batch 2, 1024x1024), all in ONE
process with the variants interleaved rep by rep, CUDA events, median of --reps after warm-up, inputs and weights
rotated over --nbuf copies so that repeated calls do not run from L2:

  bf16      F.linear(x, W, b)                                                         (the baseline)
  naive     (x / x_scale).to(fp8) -> torch._scaled_mm (per-tensor scales)             (the anchor's probe)
  q+mm      one-pass Triton quantize_activation -> torch._scaled_mm                   (best unfused path)
  mm_only   torch._scaled_mm on an already-fp8 x                                      (cuBLAS fp8 GEMM alone)
  w8a8      fpq kernel through LinearPlan (the module's path), FP8 weights, cast fused into the GEMM
  w4a8      the same with 4-bit (e2m1) weights decoded in the GEMM
  w8a8_tma                fp8_linear loading tiles through TMA tensor descriptors (less device, more host time)
  w4a8_join               4-bit decode interleaved into one B tile instead of splitting A
  w8a8_preq               fpq kernel fed an already-fp8 x (no cast in the loop: what the fusion costs)
  w8a8_cublas             fpq quantize_activation + cuBLAS rowwise-scaled fp8 GEMM, the exact W8A8 semantics
  w8a8_cublas_fast        the same with use_fast_accum=True (Hopper's fp8 accumulator is not promoted to fp32)
  mm_rowwise(_fast)       the rowwise-scaled cuBLAS GEMM alone on an already-fp8 x (what the module's GEMM costs)
  mm_only_fast            mm_only with use_fast_accum=True
  w8a8_pacc / w4a8_pacc   (--pacc) fp32 promotion of Hopper's fp8 accumulator every 64 K (errors always reported)

Host overhead: --host-shape is called back to back (no sync) and the enqueue time per call is reported.

"eager" times each call between two events (what an eager UNet sees, launch overhead included when the GPU
would otherwise wait); "graph" replays a CUDA graph of --graph-calls calls (device time only). Ratios are
bf16 time / variant time (>1 = faster than bf16), per shape and summed over the UNet's layer counts.
Also measures the bf16 matmul and fp8 _scaled_mm peaks at 8192^3 (the floor), and each kernel's error against
fp8_linear_reference. Writes JSON to --out, else $OUT/linear_kernels.json when OUT is set.

    python benchmarks/bench_linear_kernels.py [--tune] [--jobs 8] [--reps 50] [--variants a,b] [--out file.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

_PATH = Path(__file__).resolve().parents[1] / "fpq_plugin" / "kernels" / "fp8_linear.py"
E4M3 = torch.float8_e4m3fn
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def load_kernels():
    """fp8_linear by path: only this file of fpq_plugin is imported (a teammate's half-written module can't break it)."""
    name = "_fpq_bench_fp8_linear"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------------------
# UNet Linear shapes
# ------------------------------------------------------------------------------------------------------------

# (latent side of the level, channels, transformer models at that level, blocks per transformer)
UNETS = {
    # SD1.5: attention at 64/32/16 (2 down + 3 up transformers each) and the 8x8 mid block; depth 1;
    # proj_in/proj_out are 1x1 Conv2d there (use_linear_projection=False): the same GEMM, counted here.
    "sd15": dict(batch=2, ctx=768, ctx_len=77, levels=[(64, 320, 5, 1), (32, 640, 5, 1), (16, 1280, 5, 1),
                                                       (8, 1280, 1, 1)]),
    # SDXL 1024^2 = 128x128 latent: level 0 has no attention; level 1 (64x64, 640 ch): 2 down + 3 up transformers
    # of depth 2; level 2 (32x32, 1280 ch): 2 down + 1 mid + 3 up of depth 10. Context 2048 (both text encoders).
    "sdxl": dict(batch=2, ctx=2048, ctx_len=77, levels=[(64, 640, 5, 2), (32, 1280, 6, 10)]),
}


def unet_linear_shapes(model: str) -> list[dict]:
    """Distinct Linear GEMMs of one UNet call: (M, K, N), how many layers have that shape, and which."""
    u = UNETS[model]
    out: dict[tuple[int, int, int], dict] = {}

    def add(m, k, n, count, what):
        e = out.setdefault((m, k, n), dict(M=m, K=k, N=n, count=0, layers=[]))
        e["count"] += count
        e["layers"].append(f"{what} x{count}")

    for side, c, n_tr, depth in u["levels"]:
        m = u["batch"] * side * side
        blocks = n_tr * depth
        add(m, c, c, 6 * blocks, f"{side}: attn1 q/k/v/out + attn2 q/out")
        add(m, c, c, 2 * n_tr, f"{side}: proj_in/proj_out")
        add(u["batch"] * u["ctx_len"], u["ctx"], c, 2 * blocks, f"{side}: attn2 to_k/to_v")
        add(m, c, 8 * c, blocks, f"{side}: ff GEGLU proj")
        add(m, 4 * c, c, blocks, f"{side}: ff out")
    return list(out.values())


# ------------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------------


def time_eager(fns: dict, reps: int, nbuf: int, warmup: int = 3) -> dict[str, float]:
    """Median ms per call, variants interleaved call by call, each call between two CUDA events."""
    for _ in range(warmup):
        for f in fns.values():
            for i in range(nbuf):
                f(i)
    torch.cuda.synchronize()
    ev = {n: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
          for n in fns}
    for r in range(reps):
        for n, f in fns.items():
            s, e = ev[n][r]
            s.record()
            f(r % nbuf)
            e.record()
    torch.cuda.synchronize()
    return {n: statistics.median(s.elapsed_time(e) for s, e in ev[n]) for n in fns}


def host_overhead(fns: dict, calls: int = 300) -> dict[str, dict[str, float]]:
    """Per-call host cost: `calls` back-to-back calls without sync; enqueue time / calls (GPU work is tiny)."""
    res = {}
    for rep in range(3):  # three rounds, keep each variant's fastest (the VM's host timings are noisy)
        for name, f in fns.items():
            for _ in range(20):
                f(0)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                f(0)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            r = dict(enqueue_us=(t1 - t0) / calls * 1e6, wall_us=(t2 - t0) / calls * 1e6)
            if name not in res or r["enqueue_us"] < res[name]["enqueue_us"]:
                res[name] = r
    return res


def time_graph(fns: dict, reps: int, nbuf: int, calls: int) -> dict[str, float]:
    """Median ms per call from CUDA-graph replays of `calls` calls each (device time, no launch overhead)."""
    graphs = {}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns.values():
            for i in range(nbuf):
                f(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for n, f in fns.items():
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(calls):
                f(i % nbuf)
        graphs[n] = g
    for g in graphs.values():
        g.replay()
    torch.cuda.synchronize()
    ev = {n: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
          for n in fns}
    for r in range(reps):
        for n, g in graphs.items():
            s, e = ev[n][r]
            s.record()
            g.replay()
            e.record()
    torch.cuda.synchronize()
    res = {n: statistics.median(s.elapsed_time(e) for s, e in ev[n]) / calls for n in fns}
    del graphs
    return res


# ------------------------------------------------------------------------------------------------------------
# Problems
# ------------------------------------------------------------------------------------------------------------


class Problem:
    """nbuf copies of x and of the weights of one shape, in every format the variants need."""

    def __init__(self, fl, m, k, n, nbuf, seed=0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        dev = "cuda"
        self.m, self.k, self.n = m, k, n
        self.x = [torch.randn(m, k, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(nbuf)]
        self.xs = (self.x[0].float().abs().amax() / 448.0).reshape(())  # static calibrated scale, fp32 0-d
        self.w = [torch.randn(n, k, device=dev, generator=g, dtype=torch.bfloat16) * 0.05 for _ in range(nbuf)]
        self.b = torch.randn(n, device=dev, generator=g, dtype=torch.bfloat16) * 0.1
        # W8: per-output-channel scale; per-tensor copy for _scaled_mm (per-tensor scales, as the anchor probe)
        self.ws8 = [(w.float().abs().amax(dim=1) / 448.0).clamp(min=1e-12) for w in self.w]
        self.w8 = [(w.float() / s[:, None]).to(E4M3) for w, s in zip(self.w, self.ws8)]
        self.codes8 = [q.view(torch.uint8) for q in self.w8]
        self.pw8 = [fl.prepare_weight(c) for c in self.codes8]
        self.ws_t = [(w.float().abs().amax() / 448.0).reshape(()) for w in self.w]
        self.w8t = [(w.float() / s).to(E4M3).t() for w, s in zip(self.w, self.ws_t)]  # (K, N) column-major
        # W4: e2m1 codes (random), per-channel scale
        self.table = torch.tensor(E2M1, device=dev)
        kp = (k + 1) // 2
        self.codes4 = [torch.randint(0, 256, (n, kp), device=dev, generator=g, dtype=torch.int32).to(torch.uint8)
                       for _ in range(nbuf)]
        if k % 2:
            for c in self.codes4:
                c[:, -1] &= 0x0F
        self.pw4 = [fl.prepare_weight(c, self.table) for c in self.codes4]
        self.ws4 = [torch.rand(n, device=dev, generator=g) * 0.01 + 0.001 for _ in range(nbuf)]
        self.xq = [(x / self.xs).to(E4M3) for x in self.x]

    def variants(self, fl, pacc: bool, only=None):
        xs, b = self.xs, self.b
        if not hasattr(self, "plan8"):
            self.plan8 = [fl.LinearPlan(pw, ws, xs, b) for pw, ws in zip(self.pw8, self.ws8)]
            self.plan4 = [fl.LinearPlan(pw, ws, xs, b) for pw, ws in zip(self.pw4, self.ws4)]
            self.xs_col = xs.reshape(1, 1).expand(self.m, 1).contiguous()
            self.ws_row = [ws.reshape(1, -1) for ws in self.ws8]
            self.w8pc = [c.view(E4M3).t() for c in self.codes8]  # (K, N) column-major, per-channel codes
            try:  # rowwise scaling with a bias in one call, if this torch/cuBLAS allows it
                torch._scaled_mm(self.xq[0], self.w8pc[0], scale_a=self.xs_col, scale_b=self.ws_row[0], bias=b,
                                 out_dtype=torch.bfloat16)
                self.rowwise_bias = True
            except Exception:  # noqa: BLE001
                self.rowwise_bias = False

        def rowwise(q, i, fast):
            if self.rowwise_bias:
                return torch._scaled_mm(q, self.w8pc[i], scale_a=self.xs_col, scale_b=self.ws_row[i], bias=b,
                                        out_dtype=torch.bfloat16, use_fast_accum=fast)
            y = torch._scaled_mm(q, self.w8pc[i], scale_a=self.xs_col, scale_b=self.ws_row[i],
                                 out_dtype=torch.bfloat16, use_fast_accum=fast)
            return y.add_(b)

        def cublas(i, fast=False):
            return rowwise(fl.quantize_activation(self.x[i], xs), i, fast)

        self.cublas = cublas
        v = {
            "bf16": lambda i: F.linear(self.x[i], self.w[i], b),
            "naive": lambda i: torch._scaled_mm((self.x[i] / xs).to(E4M3), self.w8t[i], scale_a=xs,
                                                scale_b=self.ws_t[i], bias=b, out_dtype=torch.bfloat16),
            "q+mm": lambda i: torch._scaled_mm(fl.quantize_activation(self.x[i], xs), self.w8t[i], scale_a=xs,
                                               scale_b=self.ws_t[i], bias=b, out_dtype=torch.bfloat16),
            "mm_only": lambda i: torch._scaled_mm(self.xq[i], self.w8t[i], scale_a=xs, scale_b=self.ws_t[i],
                                                  bias=b, out_dtype=torch.bfloat16),
            "w8a8": lambda i: self.plan8[i](self.x[i]),
            "w4a8": lambda i: self.plan4[i](self.x[i]),
            "w8a8_tma": lambda i: fl.fp8_linear(self.x[i], self.pw8[i], self.ws8[i], xs, b, tma=True),
            "w4a8_join": lambda i: fl.fp8_linear(self.x[i], self.pw4[i], self.ws4[i], xs, b, w4_join=True),
            "w8a8_preq": lambda i: fl.fp8_linear(self.xq[i], self.pw8[i], self.ws8[i], xs, b),
            "w8a8_cublas": cublas,
            "w8a8_cublas_fast": lambda i: cublas(i, True),
            "mm_rowwise": lambda i: rowwise(self.xq[i], i, False),
            "mm_rowwise_fast": lambda i: rowwise(self.xq[i], i, True),
            "mm_only_fast": lambda i: torch._scaled_mm(self.xq[i], self.w8t[i], scale_a=xs, scale_b=self.ws_t[i],
                                                       bias=b, out_dtype=torch.bfloat16, use_fast_accum=True),
        }
        if pacc:
            v["w8a8_pacc"] = lambda i: fl.fp8_linear(self.x[i], self.pw8[i], self.ws8[i], xs, b, imprecise_acc=64)
            v["w4a8_pacc"] = lambda i: fl.fp8_linear(self.x[i], self.pw4[i], self.ws4[i], xs, b, imprecise_acc=64)
        if only is not None:
            v = {k: f for k, f in v.items() if k == "bf16" or k in only}
        return v

    def host_variants(self, fl):
        """Variants for the host-overhead measurement (same inputs every call)."""
        v = self.variants(fl, False)
        keep = {k: v[k] for k in ("bf16", "naive", "q+mm", "mm_only", "w8a8", "w4a8", "w8a8_cublas")}
        plan_tma = fl.LinearPlan(self.pw8[0], self.ws8[0], self.xs, self.b, tma=True)
        keep["w8a8_plan_tma"] = lambda i: plan_tma(self.x[i])
        keep["w8a8_function"] = lambda i: fl.fp8_linear(self.x[i], self.pw8[i], self.ws8[i], self.xs, self.b)

        def slow(i):
            fl.FAST_LAUNCH = False
            try:
                return fl.fp8_linear(self.x[i], self.pw8[i], self.ws8[i], self.xs, self.b)
            finally:
                fl.FAST_LAUNCH = True

        keep["w8a8_triton_launch"] = slow
        return keep

    def errors(self, fl, triton_kernels: bool = True) -> dict[str, float]:
        """max|y - ref| / max|ref| of the kernels against fp8_linear_reference (bf16 and fp32 outputs).

        ``triton_kernels=False`` measures the cuBLAS paths only (no fpq GEMM kernel is compiled).
        """
        res = {}
        xs, b = self.xs, self.b
        self.variants(fl, False)
        ref = fl.fp8_linear_reference(self.x[0], self.codes8[0], self.ws8[0], xs, b).float()
        for fast, name in ((False, "w8a8_cublas_bf16"), (True, "w8a8_cublas_fast_bf16")):
            y = self.cublas(0, fast).float()
            res[name] = (y - ref).abs().max().item() / ref.abs().max().item()
        if not triton_kernels:
            return res
        for tag, pw, codes, ws, tab in (("w8a8", self.pw8[0], self.codes8[0], self.ws8[0], None),
                                        ("w4a8", self.pw4[0], self.codes4[0], self.ws4[0], self.table)):
            for od, odn in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
                ref = fl.fp8_linear_reference(self.x[0], codes, ws, xs, b, weight_table=tab, out_dtype=od).float()
                den = ref.abs().max().item()
                for acc, tma, accn in ((0, False, ""), (64, False, "_pacc"), (0, True, "_tma")):
                    if tma and od == torch.float32:
                        continue
                    y = fl.fp8_linear(self.x[0], pw, ws, xs, b, out_dtype=od, imprecise_acc=acc, tma=tma).float()
                    res[f"{tag}{accn}_{odn}"] = (y - ref).abs().max().item() / den
        ref = fl.fp8_linear_reference(self.x[0], self.codes4[0], self.ws4[0], xs, b, weight_table=self.table).float()
        y = fl.fp8_linear(self.x[0], self.pw4[0], self.ws4[0], xs, b, w4_join=True).float()
        res["w4a8_join_bf16"] = (y - ref).abs().max().item() / ref.abs().max().item()
        ref = fl.fp8_linear_reference(self.xq[0], self.codes8[0], self.ws8[0], xs, b).float()
        y = fl.fp8_linear(self.xq[0], self.pw8[0], self.ws8[0], xs, b).float()
        res["w8a8_preq_bf16"] = (y - ref).abs().max().item() / ref.abs().max().item()
        return res


# ------------------------------------------------------------------------------------------------------------
# Parallel precompile (Triton compiles one kernel at a time; workers fill the shared on-disk cache)
# ------------------------------------------------------------------------------------------------------------


def _compile_tasks(fl, shapes, cfg_of, pacc: bool, final: bool):
    """(M, K, N, bits, config, imprecise_acc, tma, out) combinations to compile. Before tuning (final=False): the
    plain kernel for every candidate config; after (final=True): every variant and error check at the chosen one."""
    tasks = []
    for s in shapes:
        m, k, n = s["M"], s["K"], s["N"]
        for bits in (8, 4):
            for cfg in cfg_of(m, k, n, bits):
                if not final:
                    tasks.append((m, k, n, bits, cfg, 0, False, "bf16"))
                    continue
                combos = [(0, False, "bf16"), (0, True, "bf16"), (0, False, "fp32"), (64, False, "bf16"),
                          (64, False, "fp32")]
                combos.append((0, False, "preq" if bits == 8 else "join"))
                tasks += [(m, k, n, bits, cfg, acc, tma, out) for acc, tma, out in combos]
        if not final:
            tasks.append((m, k, n, 0, None, 0, False, "quant"))
    return tasks


def _compile_worker(tasks):
    fl = load_kernels()
    done = []
    for m, k, n, bits, cfg, acc, tma, out in tasks:
        t0 = time.perf_counter()
        try:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xs = torch.tensor(0.01, device="cuda")
            if out == "quant":
                fl.quantize_activation(x, xs)
            else:
                if bits == 8:
                    pw = fl.prepare_weight(torch.zeros(n, k, device="cuda", dtype=torch.uint8))
                else:
                    pw = fl.prepare_weight(torch.zeros(n, (k + 1) // 2, device="cuda", dtype=torch.uint8),
                                           torch.tensor(E2M1, device="cuda"))
                ws = torch.ones(n, device="cuda")
                b = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
                od = torch.float32 if out == "fp32" else torch.bfloat16
                xin = x.to(E4M3) if out == "preq" else x
                fl.fp8_linear(xin, pw, ws, xs, b, config=cfg, imprecise_acc=acc, tma=tma, out_dtype=od,
                              w4_join=out == "join")
            torch.cuda.synchronize()
            done.append((m, k, n, bits, cfg, acc, tma, out, "ok", time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001
            done.append((m, k, n, bits, cfg, acc, tma, out, f"{type(e).__name__}: {str(e)[:300]}",
                         time.perf_counter() - t0))
    return done


def precompile(fl, shapes, cfg_of, pacc, jobs, final):
    import multiprocessing as mp

    tasks = _compile_tasks(fl, shapes, cfg_of, pacc, final)
    # One task per compiled variant: the UNet's M/N/K values specialise alike (M is not specialised, N, K and the
    # strides are multiples of 16), so the kernel depends on bits, config, EVEN_K, accumulation, TMA and output.
    seen, uniq = set(), []
    for t in tasks:
        m, k, n, bits, cfg, acc, tma, out = t
        key = (bits, cfg, None if cfg is None else k % cfg[2] == 0, acc, tma, out, k % 16, n % 16)
        if key not in seen:
            seen.add(key)
            uniq.append(t)
    tasks = uniq
    chunks = [tasks[i::jobs] for i in range(jobs)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(jobs) as pool:
        results = [r for part in pool.map(_compile_worker, chunks) for r in part]
    bad = [r for r in results if r[8] != "ok"]
    print(f"precompiled {len(tasks)} kernels with {jobs} processes in {time.perf_counter() - t0:.1f} s"
          f" ({len(bad)} failed)", flush=True)
    for r in bad[:10]:
        print("  compile failure:", r, flush=True)
    return dict(n=len(tasks), seconds=time.perf_counter() - t0, failures=[list(map(str, r)) for r in bad])


# ------------------------------------------------------------------------------------------------------------


def kernel_report(fl, dump_dir=None) -> list[dict]:
    """Resource report of every compiled fp8_linear kernel: registers, spills, shared memory, MMA instructions."""
    triton, kern, _ = fl._kernels()
    rows, dumps = [], []
    for per_dev in getattr(kern, "device_caches", {}).values():
        cache = per_dev[0] if isinstance(per_dev, (tuple, list)) else per_dev
        for key, ck in cache.items():
            md = ck.metadata
            c = dict(name=getattr(md, "name", "?"), n_regs=getattr(ck, "n_regs", None),
                     n_spills=getattr(ck, "n_spills", None), shared=getattr(md, "shared", None),
                     num_warps=getattr(md, "num_warps", None), num_stages=getattr(md, "num_stages", None))
            c["key"] = str(key)[:400]
            try:
                sass = ck.asm["sass"]
                for ins in ("QGMMA", "HGMMA", "HMMA", "F2FP", "PRMT", "LDL", "STL"):
                    c["sass_" + ins] = sass.count(ins)
            except Exception as e:  # noqa: BLE001
                c["sass_error"] = str(e)[:100]
            try:
                ptx = ck.asm["ptx"]
                c["ptx_wgmma"] = ptx.count("wgmma.mma_async")
                c["ptx_cvt_e4m3x2"] = ptx.count("e4m3x2.f32")
                if dump_dir is not None and len(dumps) < 6:
                    dumps.append(f"==== {c}\n" + ck.asm.get("ttgir", ""))
            except Exception:  # noqa: BLE001
                pass
            rows.append(c)
    if dump_dir is not None and dumps:
        Path(dump_dir, "ttgir.txt").write_text("\n\n".join(dumps))
    return rows


def peaks(reps=20):
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    a8, b8 = a.to(E4M3), b.to(E4M3).t().contiguous().t()
    one = torch.tensor(1.0, device="cuda")
    fl = load_kernels()
    pw = fl.prepare_weight(b.to(E4M3).view(torch.uint8))
    ws = torch.ones(n, device="cuda")
    fns = {
        "bf16_matmul": lambda i: torch.matmul(a, b),
        "fp8_scaled_mm": lambda i: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
        "w8a8_kernel_bf16_in": lambda i: fl.fp8_linear(a, pw, ws, one),
    }
    t = time_eager(fns, reps, 1)
    flop = 2 * n**3
    return {k: dict(ms=v, tflops=flop / v / 1e9) for k, v in t.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--graph-reps", type=int, default=20)
    ap.add_argument("--graph-calls", type=int, default=8)
    ap.add_argument("--nbuf", type=int, default=4)
    ap.add_argument("--tune", action="store_true", help="time the candidate block configs per shape first")
    ap.add_argument("--pacc", action="store_true", help="also time the promoted-accumulation variants")
    ap.add_argument("--host-shape", default="154,768,320", help="M,K,N of the host-overhead measurement")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="precompile processes (0: none)")
    ap.add_argument("--models", default="sd15,sdxl")
    ap.add_argument("--variants", default=None,
                    help="comma list of variants to time besides bf16 (default: all); with only cuBLAS variants "
                         "pass --jobs 0 --no-host: no fpq GEMM kernel is compiled")
    ap.add_argument("--no-host", action="store_true", help="skip the host-overhead measurement")
    args = ap.parse_args()
    only = None if args.variants is None else set(args.variants.split(","))
    triton_kernels = only is None or any(v.startswith(("w8a8", "w4a8")) and "cublas" not in v for v in only)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    fl = load_kernels()
    import triton

    t_start = time.perf_counter()
    pacc = args.pacc
    models = args.models.split(",")
    per_model = {mname: unet_linear_shapes(mname) for mname in models}
    distinct: dict[tuple, dict] = {}
    for mname, shapes in per_model.items():
        for s in shapes:
            distinct.setdefault((s["M"], s["K"], s["N"]), dict(M=s["M"], K=s["K"], N=s["N"]))
    report = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        capability=list(torch.cuda.get_device_capability()), args=vars(args),
        notes="all shapes benchmarked with a bias; ratios = bf16 ms / variant ms (>1 faster)",
    )
    shapes = list(distinct.values())
    if args.tune:
        cands = lambda m, k, n, bits: fl._CANDIDATES[fl._bucket(m)]  # noqa: E731
        if args.jobs > 0:
            report["precompile_candidates"] = precompile(fl, shapes, cands, pacc, args.jobs, final=False)
        tuned_all = {}
        t0 = time.perf_counter()
        for s in shapes:
            m, k, n = s["M"], s["K"], s["N"]
            p = Problem(fl, m, k, n, 1, seed=m + k + n)
            for bits, pws, wss in ((8, p.pw8, p.ws8), (4, p.pw4, p.ws4)):
                best, timings = fl.tune_config(p.x[0], pws[0], wss[0], p.xs, p.b)
                tuned_all[(m, k, n, bits)] = dict(best=list(best), timings=[[list(c), t] for c, t in timings])
            del p
        print(f"tuned {len(shapes)} shapes in {time.perf_counter() - t0:.1f} s", flush=True)
    chosen = lambda m, k, n, bits: [fl._TUNED.get((m, n, k, bits)) or fl.default_config(m, n, k, bits)]  # noqa: E731
    if args.jobs > 0:
        report["precompile_final"] = precompile(fl, shapes, chosen, pacc, args.jobs, final=True)

    if not args.no_host:
        hm, hk, hn = map(int, args.host_shape.split(","))
        hp = Problem(fl, hm, hk, hn, 1, seed=1)
        report["host_overhead_us"] = host_overhead(hp.host_variants(fl))
        del hp
        print("host us/call (enqueue, back-to-back): " + " ".join(
            f"{k} {v['enqueue_us']:.1f}" for k, v in report["host_overhead_us"].items()), flush=True)

    report["peaks_8192"] = peaks()
    for k, v in report["peaks_8192"].items():
        print(f"peak {k:22s} {v['ms']:.3f} ms  {v['tflops']:.0f} TFLOP/s", flush=True)

    results = {}
    for key, s in distinct.items():
        m, k, n = key
        t0 = time.perf_counter()
        p = Problem(fl, m, k, n, args.nbuf, seed=m + k + n)
        entry = dict(M=m, K=k, N=n, gflop=2 * m * k * n / 1e9)
        if args.tune:
            entry["tuned"] = {f"w{bits}": tuned_all[(m, k, n, bits)] for bits in (8, 4)}
        entry["config_w8"] = chosen(m, k, n, 8)[0]
        entry["config_w4"] = chosen(m, k, n, 4)[0]
        fns = p.variants(fl, pacc, only)
        ok = {}
        for name, f in fns.items():  # a variant that fails is reported, not fatal
            try:
                f(0)
                torch.cuda.synchronize()
                ok[name] = f
            except Exception as e:  # noqa: BLE001
                entry.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"  {key} {name} failed: {entry['errors'][name]}", flush=True)
        entry["eager_ms"] = time_eager(ok, args.reps, args.nbuf)
        try:
            entry["graph_ms"] = time_graph(ok, args.graph_reps, args.nbuf, args.graph_calls)
        except Exception as e:  # noqa: BLE001
            entry["graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        try:
            entry["rel_err"] = p.errors(fl, triton_kernels)
        except Exception as e:  # noqa: BLE001
            entry["rel_err_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        entry["seconds"] = time.perf_counter() - t0
        results[key] = entry
        eg = entry["eager_ms"]
        gr = entry.get("graph_ms", {})
        print(f"M={m:5d} K={k:5d} N={n:5d}  bf16 {eg.get('bf16', math.nan) * 1e3:7.1f} us | eager x: "
              + " ".join(f"{nm} {eg['bf16'] / t:.2f}" for nm, t in eg.items() if nm != "bf16")
              + " | graph x: " + " ".join(f"{nm} {gr['bf16'] / t:.2f}" for nm, t in gr.items() if nm != "bf16")
              + " | err " + " ".join(f"{a}={b:.1e}" for a, b in entry.get("rel_err", {}).items() if "bf16" in a),
              flush=True)
        del p
        torch.cuda.empty_cache()

    summary = {}
    for mname, shapes in per_model.items():
        summary[mname] = {}
        for mode in ("eager_ms", "graph_ms"):
            tot = {}
            for s in shapes:
                r = results[(s["M"], s["K"], s["N"])]
                for nm, t in r.get(mode, {}).items():
                    tot[nm] = tot.get(nm, 0.0) + s["count"] * t
            summary[mname][mode] = dict(total_ms=tot, speedup_vs_bf16={nm: tot["bf16"] / t for nm, t in tot.items()})
    report["models"] = {mname: [dict(s, **{k: v for k, v in results[(s["M"], s["K"], s["N"])].items()
                                          if k not in ("M", "K", "N")}) for s in shapes]
                        for mname, shapes in per_model.items()}
    report["summary"] = summary
    try:
        report["kernels"] = kernel_report(fl, os.environ.get("OUT"))
        for c in report["kernels"]:
            print("kernel", {k: v for k, v in c.items() if k not in ("key", "name")}, c["key"][-160:], flush=True)
    except Exception as e:  # noqa: BLE001
        print("kernel report failed:", e)
    report["seconds"] = time.perf_counter() - t_start

    out = args.out or (os.path.join(os.environ["OUT"], "linear_kernels.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {out}")

    names = list(next(iter(summary.values()))["eager_ms"]["total_ms"])
    print("\nSummed over each UNet's Linear layers: speed-up vs bf16 F.linear (bf16 ms / variant ms)")
    print(f"{'model':6s} {'timing':6s} {'bf16 ms':>8s} " + " ".join(f"{nm:>9s}" for nm in names if nm != "bf16"))
    for mname, sm in summary.items():
        for mode in ("eager_ms", "graph_ms"):
            d = sm[mode]
            if "bf16" not in d["total_ms"]:
                continue
            print(f"{mname:6s} {mode[:-3]:6s} {d['total_ms']['bf16']:8.2f} "
                  + " ".join(f"{d['speedup_vs_bf16'].get(nm, math.nan):9.2f}" for nm in names if nm != "bf16"))
    print(f"total {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
