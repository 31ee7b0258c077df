"""The node pack inside a real ComfyUI server, driven over HTTP.

Needs a ComfyUI checkout: ``COMFYUI_PATH=/path/to/ComfyUI`` and, if ComfyUI has its own environment,
``FPQ_COMFY_PYTHON=/path/to/that/python`` (default: this python). That environment needs fpq's dependencies
(``pip install -e <this repo>`` or ``pip install -r requirements.txt``). Without ``COMFYUI_PATH`` every test skips.

The fixture writes a random-weight SD1.5-family model set (``make_comfy_test_models.py``), builds a throwaway ComfyUI
base directory in tmp (``custom_nodes/fpq`` -> this repo, ``models/``, ``output/``), and starts
``main.py --cpu --base-directory <tmp>`` on a free loopback port. Nothing is written into the ComfyUI checkout.
``FPQ_COMFY_SERVER_ARGS`` replaces ``--cpu`` (e.g. "" on a GPU machine); ``FPQ_COMFY_LOG_DIR`` keeps the server log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.comfy

REPO = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
COMFY_PYTHON = os.environ.get("FPQ_COMFY_PYTHON", sys.executable)
# ComfyUI's device flags. "--cpu" by default; on a GPU machine set FPQ_COMFY_SERVER_ARGS="" (or "--lowvram") to run
# the same tests on the GPU, where the plain -> quantized -> plain test also checks the FP8 tensor-core path ran.
SERVER_ARGS = os.environ.get("FPQ_COMFY_SERVER_ARGS", "--cpu").split()

UNET, CLIP, VAE, LORA = (
    "tiny_sd15_unet.safetensors",
    "tiny_clip_l.safetensors",
    "tiny_sd_vae.safetensors",
    "tiny_lora.safetensors",
)
COMFY_FP8_UNET = "tiny_sd15_unet_comfy_fp8.safetensors"
CONTROLNET = "tiny_sd15_controlnet.safetensors"


def _skip_reason() -> str | None:
    if not COMFYUI_PATH:
        return "set COMFYUI_PATH to a ComfyUI checkout (and FPQ_COMFY_PYTHON to its python) to run the server tests"
    if not (Path(COMFYUI_PATH) / "main.py").is_file():
        return f"COMFYUI_PATH={COMFYUI_PATH} has no main.py; point it at a ComfyUI checkout"
    if not Path(COMFY_PYTHON).is_file():
        return f"FPQ_COMFY_PYTHON={COMFY_PYTHON} does not exist"
    return None


if _skip_reason():
    pytest.skip(_skip_reason(), allow_module_level=True)


# ---- a small ComfyUI client -----------------------------------------------------------------------------------------
class Comfy:
    """HTTP client of one ComfyUI server whose base directory is ``base``."""

    def __init__(self, url: str, base: Path, log: Path) -> None:
        self.url, self.base, self.log = url, base, log

    def request(self, path: str, payload: dict | None = None, timeout: float = 30) -> tuple[int, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read()
                return resp.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def submit(self, graph: dict) -> tuple[int, Any]:
        return self.request("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})

    def run(self, graph: dict, timeout: float = 1500) -> dict:
        """Queue ``graph`` and wait for its history entry (whatever its outcome).

        The timeout is long: a graph whose "FP Quantize UNet" builds runs fpq's method on the CPU (minutes).
        """
        status, body = self.submit(graph)
        assert status == 200, f"prompt rejected ({status}): {json.dumps(body)[:2000]}"
        prompt_id = body["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, history = self.request(f"/history/{prompt_id}")
            if history and prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            time.sleep(0.1)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s; server log: {self.log}")

    def image(self, graph: dict, timeout: float = 1500) -> tuple[np.ndarray, float]:
        """Run a graph ending in SaveImage node "9"; returns its image (uint8 HxWx3) and the wall time."""
        start = time.perf_counter()
        entry = self.run(graph, timeout)
        seconds = time.perf_counter() - start
        assert entry["status"]["status_str"] == "success", _error_text(entry)
        info = entry["outputs"]["9"]["images"][0]
        from PIL import Image

        path = self.base / "output" / info["subfolder"] / info["filename"]
        return np.asarray(Image.open(path).convert("RGB")), seconds

    def node_reports(self) -> list[dict[str, Any]]:
        """The summary line "FP Quantize UNet" logs per run, parsed: recipe, hit, MiB before/after, seconds."""
        pattern = re.compile(
            r"fpq: (\S+) \((\w+)\): \d+ layers \(.*?\) (quantized|loaded from the fpq cache), model ([\d.]+) MiB -> "
            r"([\d.]+) MiB, calibration ([\d.]+) s, total ([\d.]+) s"
        )
        return [
            {"recipe": m[0], "quality": m[1], "hit": m[2] != "quantized", "float_mib": float(m[3]),
             "quantized_mib": float(m[4]), "calibration_s": float(m[5]), "total_s": float(m[6])}
            for m in pattern.findall(self.log.read_text())
        ]  # fmt: skip

    def quantize_runs(self) -> tuple[int, int]:
        """How often "FP Quantize UNet" has run so far: (quantized, loaded from the fpq cache), from its log lines."""
        text = self.log.read_text()
        return text.count(") quantized, model"), text.count(") loaded from the fpq cache, model")

    def on_cuda(self) -> bool:
        """True when the server computes on an NVIDIA GPU (started without --cpu on a CUDA machine)."""
        _, stats = self.request("/system_stats")
        return any(d.get("type") == "cuda" for d in (stats or {}).get("devices", []))

    def async_allocator(self) -> bool:
        """True when the server's PyTorch uses the cudaMallocAsync allocator (ComfyUI's default on CUDA; off with
        ``--disable-cuda-malloc``), from the device line ComfyUI logs at start."""
        return bool(re.search(r"^Device: cuda.*: cudaMallocAsync", self.log.read_text(), re.M))

    def float_bytes_per_weight(self) -> int:
        """Bytes per weight of the float UNet as ComfyUI loaded it: fp32 on the CPU, fp16 or bf16 on most GPUs (or
        with ``--fp16-unet``). Size bounds are stated per fp32 weight and scaled by this."""
        found = re.findall(r"model weight dtype torch\.(\w+)", self.log.read_text())
        return {"float16": 2, "bfloat16": 2}.get(found[-1] if found else "float32", 4)

    def free(self) -> None:
        """Unload every model and drop ComfyUI's node-output cache (the next prompt runs from scratch)."""
        self.request("/free", {"unload_models": True, "free_memory": True})


def _error_text(entry: dict) -> str:
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_type')}: {data.get('exception_message')}"
    return json.dumps(entry["status"])[:2000]


def _execution_error(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", "the prompt was expected to fail"
    return next(data for kind, data in entry["status"]["messages"] if kind == "execution_error")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("comfy")
    # keep __pycache__ out of the ComfyUI checkout; ControlNet steps replay CUDA graphs (the default, which the
    # ControlNet test checks against eager calls on a GPU) whatever the caller's environment says
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "FPQ_GRAPH_CONTROLNET": "1"}
    # The server imports fpq_plugin from this checkout, even when ComfyUI's environment has another copy installed
    # (an editable install of a different worktree, say). Only the package goes on the path, through a folder
    # holding a link to it: the repository root itself must not, as its nodes/ would shadow ComfyUI's nodes.py.
    shim = base / "pythonpath"
    shim.mkdir()
    (shim / "fpq_plugin").symlink_to(REPO / "fpq_plugin", target_is_directory=True)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)
    # One torch thread: on a busy 2-core machine, two threads competing with other jobs ran ten times slower.
    env.setdefault("OMP_NUM_THREADS", "1")
    made = subprocess.run(
        [COMFY_PYTHON, str(Path(__file__).with_name("make_comfy_test_models.py")),
         "--comfyui", COMFYUI_PATH, "--models-dir", str(base / "models")],
        env=env, cwd=base, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert made.returncode == 0, f"making the test models failed:\n{made.stderr[-4000:]}"
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "fpq").symlink_to(REPO, target_is_directory=True)
    port = _free_port()
    log = base / "server.log"
    with open(log, "w") as log_fh:
        server = subprocess.Popen(
            [COMFY_PYTHON, str(Path(COMFYUI_PATH) / "main.py"), *SERVER_ARGS, "--listen", "127.0.0.1",
             "--port", str(port), "--disable-auto-launch", "--base-directory", str(base), "--database-url", "sqlite:///:memory:"],
            cwd=base, env=env, stdout=log_fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    client = Comfy(f"http://127.0.0.1:{port}", base, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise AssertionError(f"ComfyUI exited with {server.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if client.request("/system_stats", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"ComfyUI did not answer in 120 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield client
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        if os.environ.get("FPQ_COMFY_LOG_DIR"):  # keep the server's log (a GPU machine's tmp is gone after the run)
            Path(os.environ["FPQ_COMFY_LOG_DIR"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(log, Path(os.environ["FPQ_COMFY_LOG_DIR"]) / f"comfy_server_{base.name}.log")


# ---- graphs ---------------------------------------------------------------------------------------------------------
def t2i_graph(seed: int = 1, *, quantize: dict | None = None, lora: bool = False, lora_before: bool = False,
              unet_dtype: str = "default", load: str | None = None, prefix: str = "t2i", steps: int = 4,
              control: bool = False) -> dict:  # fmt: skip
    """UNETLoader/CLIPLoader/VAELoader -> [LoRA] -> [FP Quantize UNet] -> [LoRA] -> KSampler (64x64, ``steps``) ->
    SaveImage "9".

    ``lora``: the test LoRA after the quantize node (or on the plain model); ``lora_before``: before it.
    ``load``: take the MODEL from "Load FP Quantized UNet" with this file instead of UNETLoader.
    ``control``: both conditionings through ControlNetApplyAdvanced with the test ControlNet on an orange image.
    """
    graph: dict[str, Any] = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": UNET, "weight_dtype": unet_dtype}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP, "type": "stable_diffusion"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in the snow", "clip": ["2", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["3", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }
    model = ["1", 0]
    if load is not None:
        graph["1"] = {"class_type": "FPQLoadQuantizedUNet", "inputs": {"unet_name": load}}
    if lora_before:
        graph["12"] = {"class_type": "LoraLoaderModelOnly",
                       "inputs": {"model": model, "lora_name": LORA, "strength_model": 1.0}}  # fmt: skip
        model = ["12", 0]
    if quantize is not None:
        inputs = {"model": model, "recipe": "w8a8", "quality": "fast", "clip": ["2", 0], "calibration_resolution": 64}
        graph["10"] = {"class_type": "FPQuantizeUNet", "inputs": {**inputs, **quantize}}
        model = ["10", 0]
    if lora:
        graph["11"] = {"class_type": "LoraLoaderModelOnly",
                       "inputs": {"model": model, "lora_name": LORA, "strength_model": 1.0}}  # fmt: skip
        model = ["11", 0]
    positive, negative = ["4", 0], ["5", 0]
    if control:
        graph["20"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
        graph["21"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                               "color": 0xFF8000}}  # fmt: skip
        graph["22"] = {"class_type": "ControlNetApplyAdvanced",
                       "inputs": {"positive": positive, "negative": negative, "control_net": ["20", 0],
                                  "image": ["21", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        positive, negative = ["22", 0], ["22", 1]
    graph["7"] = {
        "class_type": "KSampler",
        "inputs": {"model": model, "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
                   "scheduler": "normal", "positive": positive, "negative": negative, "latent_image": ["6", 0],
                   "denoise": 1.0},
    }  # fmt: skip
    return graph


def diff(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """(mean, max) absolute difference in 8-bit levels."""
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), int(d.max())


# ---- tests ----------------------------------------------------------------------------------------------------------
def test_nodes_are_registered(comfy: Comfy) -> None:
    status, info = comfy.request("/object_info")
    assert status == 200
    assert info["FPQuantizeUNet"]["display_name"] == "FP Quantize UNet"
    assert info["FPQLoadQuantizedUNet"]["display_name"] == "Load FP Quantized UNet"
    assert info["FPQSaveQuantizedUNet"]["display_name"] == "Save FP Quantized UNet"
    required = info["FPQuantizeUNet"]["input"]["required"]
    assert required["recipe"][0] == ["w8a8", "w4a8", "w4a16", "w8a16"]
    assert required["quality"][0] == ["fast", "standard", "best"]
    assert "clip" in info["FPQuantizeUNet"]["input"]["optional"]
    assert info["FPQSaveQuantizedUNet"]["input"]["optional"]["format"][0] == ["fpq", "comfy_quant"]
    # The server runs this checkout's fpq_plugin (not another copy installed in ComfyUI's environment).
    assert f"fpq: nodes use fpq_plugin from {REPO / 'fpq_plugin'}" in comfy.log.read_text()


def test_quantized_graph_is_close_to_plain_and_leaves_it_unchanged(comfy: Comfy) -> None:
    plain, t_plain = comfy.image(t2i_graph(prefix="plain"))
    built, hits = comfy.quantize_runs()
    quant, t_quant = comfy.image(t2i_graph(quantize={}, prefix="w8a8"))
    assert comfy.quantize_runs() == (built + 1, hits), "the first w8a8 run should calibrate and quantize"
    mean, peak = diff(plain, quant)
    print(f"\nplain {t_plain:.1f} s; w8a8 with calibration {t_quant:.1f} s; image diff mean {mean:.2f} max {peak}")
    assert 0 < mean < 8, "a w8a8 image should differ from full precision, slightly"

    # Same inputs, another sampler seed: ComfyUI reuses the node's output, the node does not run.
    _, t_same = comfy.image(t2i_graph(seed=2, quantize={}, prefix="w8a8_seed2"))
    assert comfy.quantize_runs() == (built + 1, hits)

    again, _ = comfy.image(t2i_graph(prefix="plain_again"))
    assert np.array_equal(plain, again), "the plain graph's image changed after the quantized run"
    if comfy.on_cuda():  # sm_89+: the W8A8 Linear layers must have run on the FP8 tensor cores, not a fallback
        log = comfy.log.read_text()
        used = re.findall(r"runs quantized (\w+) layers on '(\w+)' \((cuda[^,]*)", log)
        print(f"backends used on the GPU: {sorted(set(used))}")
        if "is not using the 'fp8' backend on this machine" not in log:  # fpq's one-time warning on pre-sm_89 GPUs
            assert any(kind == "linear" and name == "fp8" for kind, name, _ in used), used

    # After unloading everything, the node runs again and finds its result in fpq's cache (models/fpq_cache).
    comfy.free()
    cached, t_cached = comfy.image(t2i_graph(quantize={}, prefix="w8a8_cached"))
    assert comfy.quantize_runs() == (built + 1, hits + 1), "the second w8a8 run should be an fpq cache hit"
    assert np.array_equal(quant, cached), "a cache hit should give the same model"
    build, hit = comfy.node_reports()[-2:]
    print(
        f"w8a8 again, node output reused by ComfyUI: {t_same:.1f} s; after /free (cold loaders), graph with an fpq "
        f"cache hit: {t_cached:.1f} s\nnode time: build {build['total_s']:.1f} s (calibration "
        f"{build['calibration_s']:.1f} s), cache hit {hit['total_s']:.1f} s; UNet {build['float_mib']} MiB -> "
        f"{build['quantized_mib']} MiB"
    )
    assert hit["hit"] and not build["hit"]
    assert hit["total_s"] < 0.5 * build["total_s"], "a cache hit should be much faster than calibrating"
    fp32_mib = build["float_mib"] * 4 / comfy.float_bytes_per_weight()
    assert build["quantized_mib"] < 0.3 * fp32_mib, "w8a8 should store about a quarter of the fp32 bytes"


def test_weight_only_recipe_needs_no_clip(comfy: Comfy) -> None:
    plain, _ = comfy.image(t2i_graph(prefix="plain"))
    graph = t2i_graph(quantize={"recipe": "w8a16"}, prefix="w8a16")
    del graph["10"]["inputs"]["clip"]
    image, seconds = comfy.image(graph)
    mean, peak = diff(plain, image)
    print(f"\nw8a16: {seconds:.1f} s, image diff mean {mean:.2f} max {peak}")
    assert 0 < mean < 8


def test_lora_after_quantization_reaches_the_quantized_layers(comfy: Comfy) -> None:
    """A LoRA after the node patches the quantized weights (requantized) and is undone exactly when removed.

    Weight-only (w8a16): the quantized model with the LoRA must track the float model with the LoRA. An activation
    recipe (w8a8) has static activation scales calibrated without the LoRA; this test LoRA (as large as the weights)
    pushes the inputs of many layers (attention outputs) past them, so w8a8 + LoRA drifts from float + LoRA (mean
    about 13 levels vs 4 without the LoRA, on 0.8.0): that is why the README says to put LoRAs before the node for
    activation recipes (tested below). The LoRA must still take its full effect, and removing it must restore the
    quantized model exactly.
    """
    plain, _ = comfy.image(t2i_graph(prefix="plain"))
    plain_lora, _ = comfy.image(t2i_graph(lora=True, prefix="plain_lora"))
    float_effect, _ = diff(plain, plain_lora)
    for recipe in ("w8a16", "w8a8"):
        graphs = [t2i_graph(quantize={"recipe": recipe}, lora=lora, prefix=f"{recipe}_lora{int(lora)}")
                  for lora in (False, True, False)]  # fmt: skip
        if recipe == "w8a16":
            for graph in graphs:
                del graph["10"]["inputs"]["clip"]  # data-free round-to-nearest: no calibration
        quant, quant_lora, again = (comfy.image(graph)[0] for graph in graphs)
        lora_effect, _ = diff(quant, quant_lora)
        to_float_lora, _ = diff(plain_lora, quant_lora)
        to_float, _ = diff(plain, quant)
        print(
            f"\n{recipe}: LoRA effect on the float image {float_effect:.2f}, on the {recipe} image {lora_effect:.2f}; "
            f"{recipe} vs float: {to_float:.2f} without the LoRA, {to_float_lora:.2f} with it (mean levels)"
        )
        assert lora_effect > 0.5 * float_effect, f"the LoRA should act on the {recipe} model as on the float one"
        if recipe == "w8a16":
            assert lora_effect > 4 * to_float_lora, "weight-only + LoRA should stay close to float + LoRA"
        assert np.array_equal(quant, again), f"removing the LoRA should restore the {recipe} model exactly"


def test_lora_before_the_node_is_calibrated_with(comfy: Comfy) -> None:
    """For activation recipes, a LoRA goes before the node: it is baked into the float copy, which is calibrated and
    quantized (a new cache entry: the fingerprint covers the LoRA), so w8a8 + LoRA is as close to float + LoRA as
    plain w8a8 is to float."""
    plain, _ = comfy.image(t2i_graph(prefix="plain"))
    plain_lora, _ = comfy.image(t2i_graph(lora=True, prefix="plain_lora"))
    built, hits = comfy.quantize_runs()
    quant_lora, seconds = comfy.image(t2i_graph(quantize={}, lora_before=True, prefix="lora_w8a8"))
    assert comfy.quantize_runs() == (built + 1, hits), "a LoRA before the node should give a new model, not a hit"
    lora_effect, _ = diff(plain, plain_lora)
    to_float_lora, peak = diff(plain_lora, quant_lora)
    print(
        f"\nLoRA -> w8a8: graph {seconds:.1f} s; vs float + LoRA mean {to_float_lora:.2f} max {peak}; LoRA effect on "
        f"the float image {lora_effect:.2f}"
    )
    assert 0 < to_float_lora < 8, "w8a8 of the LoRA'd model should be close to, not equal to, float + LoRA"
    assert lora_effect > 3 * to_float_lora


def test_save_then_load_gives_the_same_image(comfy: Comfy) -> None:
    quant, _ = comfy.image(t2i_graph(quantize={}, prefix="w8a8"))
    save = t2i_graph(quantize={})
    save = {k: v for k, v in save.items() if k in ("1", "2", "10")}
    save["20"] = {"class_type": "FPQSaveQuantizedUNet", "inputs": {"model": ["10", 0], "filename_prefix": "tiny"}}
    entry = comfy.run(save)
    assert entry["status"]["status_str"] == "success", _error_text(entry)
    saved = sorted((comfy.base / "models" / "fpq_unets").glob("tiny_*.safetensors"))
    assert saved, "Save FP Quantized UNet wrote no file"
    size_mib = saved[-1].stat().st_size / 2**20
    float_mib = (comfy.base / "models" / "diffusion_models" / UNET).stat().st_size / 2**20
    loaded, seconds = comfy.image(t2i_graph(load=saved[-1].name, prefix="loaded"))
    print(
        f"\nsaved {saved[-1].name}: {size_mib:.1f} MiB (fp16 file {float_mib:.1f} MiB); "
        f"load + generate {seconds:.1f} s"
    )
    assert size_mib < 0.6 * float_mib
    assert np.array_equal(quant, loaded), "the loaded model should generate the quantized model's image exactly"


def test_cuda_graph_replay_gives_the_eager_image(comfy: Comfy) -> None:
    """The node's ``cuda_graphs`` input (on by default): on a GPU the sampler's UNet calls replay a captured graph and
    the image is bit-identical to plain calls; on the CPU nothing is captured."""
    start = len(comfy.log.read_text())

    def captures() -> int:
        return comfy.log.read_text()[start:].count("fpq: CUDA graphs: captured the forward")

    before = captures()
    eager, t_eager = comfy.image(t2i_graph(quantize={"cuda_graphs": False}, steps=12, prefix="w8a8_eager"))
    assert captures() == before, "cuda_graphs=False must not capture"
    graphed, t_graphed = comfy.image(t2i_graph(quantize={"cuda_graphs": True}, steps=12, prefix="w8a8_graphed"))
    captured = captures() - before
    # Same node inputs, another seed: ComfyUI reuses the node's model, whose graphs replay without a new capture.
    _, t_again = comfy.image(t2i_graph(seed=3, quantize={"cuda_graphs": True}, steps=12, prefix="w8a8_graphed_3"))
    allocator = "cudaMallocAsync" if comfy.async_allocator() else "native"
    print(f"\n12 steps: eager {t_eager:.2f} s, graphed {t_graphed:.2f} s (with {captured} capture(s)), graphed again "
          f"{t_again:.2f} s; allocator {allocator}")  # fmt: skip
    assert np.array_equal(eager, graphed), "a CUDA-graph replay must give the eager image exactly"
    log = comfy.log.read_text()[start:]
    if comfy.on_cuda():  # ComfyUI's default cudaMallocAsync allocator, or --disable-cuda-malloc: both capture
        # KSampler batches cond and uncond: one latent shape, so one capture (at most one per signature seen)
        assert 1 <= captured <= 3, captured
        assert captures() - before == captured, "the second image should replay the graphs it captured"
        assert "dropping" not in log and "CUDA graph capture failed" not in log, log[-3000:]
    else:
        assert captured == 0


def test_a_controlnet_steers_the_quantized_model_as_it_steers_the_plain_one(comfy: Comfy) -> None:
    """ControlNet residuals reach fpq's UNet: they move the quantized image about as far as the plain one, and the
    quantized ControlNet image stays near the plain ControlNet image. ControlNet steps replay CUDA graphs (the
    default), so on a GPU the image must be the eager one."""
    plain, _ = comfy.image(t2i_graph(prefix="cn_none_plain"))
    plain_cn, _ = comfy.image(t2i_graph(control=True, prefix="cn_plain"))
    quant, _ = comfy.image(t2i_graph(quantize={}, prefix="cn_none_w8a8"))
    start = len(comfy.log.read_text())
    quant_cn, _ = comfy.image(t2i_graph(control=True, quantize={}, prefix="cn_w8a8"))
    graphed_log = comfy.log.read_text()[start:]
    eager_cn, _ = comfy.image(t2i_graph(control=True, quantize={"cuda_graphs": False}, prefix="cn_w8a8_eager"))
    moved_plain, moved_quant = diff(plain, plain_cn)[0], diff(quant, quant_cn)[0]
    error = diff(plain_cn, quant_cn)[0]
    print(f"\nControlNet moves the image by {moved_plain:.2f} (plain) / {moved_quant:.2f} (w8a8) levels; w8a8 vs "
          f"plain with the ControlNet {error:.2f}")  # fmt: skip
    assert moved_plain > 4 and 0.5 * moved_plain < moved_quant < 2 * moved_plain, (moved_plain, moved_quant)
    assert 0 < error < 8 and error < moved_quant, error
    assert np.array_equal(quant_cn, eager_cn), "a replay with ControlNet residuals must give the eager image"
    if comfy.on_cuda():  # the ControlNet signature was captured during the graphed run, not refused or failed
        log = graphed_log
        assert "fpq: CUDA graphs: captured the forward" in log and "a ControlNet is connected" not in log, log[-3000:]
        assert "CUDA graph capture failed" not in log, log[-3000:]


def test_bad_inputs_are_node_errors(comfy: Comfy) -> None:
    # Activation recipes need the CLIP for calibration.
    graph = t2i_graph(quantize={"clip": None})
    del graph["10"]["inputs"]["clip"]
    error = _execution_error(comfy.run(graph))
    assert error["node_type"] == "FPQuantizeUNet" and "connect a CLIP" in error["exception_message"]

    # An FP8-cast model from ComfyUI's own loader is refused, not quantized twice.
    error = _execution_error(comfy.run(t2i_graph(quantize={}, unet_dtype="fp8_e4m3fn")))
    assert error["node_type"] == "FPQuantizeUNet" and "weight_dtype" in error["exception_message"]

    # So is a model in ComfyUI's own FP8 format (comfy_quant; the test model exists on ComfyUI >= 0.8 only).
    if (comfy.base / "models" / "diffusion_models" / COMFY_FP8_UNET).is_file():
        graph = t2i_graph(quantize={})
        graph["1"]["inputs"]["unet_name"] = COMFY_FP8_UNET
        error = _execution_error(comfy.run(graph))
        assert error["node_type"] == "FPQuantizeUNet" and "quantized weights" in error["exception_message"]

    # Saving a float model is refused.
    save = {"class_type": "FPQSaveQuantizedUNet", "inputs": {"model": ["1", 0], "filename_prefix": "x"}}
    graph = {"1": t2i_graph()["1"], "20": save}
    error = _execution_error(comfy.run(graph))
    assert error["node_type"] == "FPQSaveQuantizedUNet" and "not quantized by fpq" in error["exception_message"]

    # A damaged file in models/fpq_unets is reported with its path.
    bad = comfy.base / "models" / "fpq_unets" / "damaged.safetensors"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"not a safetensors file")
    error = _execution_error(comfy.run(t2i_graph(load=bad.name, prefix="bad")))
    assert error["node_type"] == "FPQLoadQuantizedUNet" and "damaged.safetensors" in error["exception_message"]

    # Values outside the lists are rejected by ComfyUI's validation before anything runs.
    status, body = comfy.submit(t2i_graph(quantize={"recipe": "w2a2"}))
    assert status == 400 and "10" in body["node_errors"]

    # The server is still healthy.
    assert comfy.request("/system_stats")[0] == 200


def test_interrupt_stops_quantization_and_the_server_carries_on(comfy: Comfy) -> None:
    built, hits = comfy.quantize_runs()
    cache = comfy.base / "models" / "fpq_cache"
    locks = set(cache.glob("*.lock"))
    status, body = comfy.submit(t2i_graph(quantize={"quality": "best"}, prefix="interrupted"))
    assert status == 200
    # The node takes the cache entry's lock when it starts building: then calibration (16 prompts x 16 steps) runs.
    deadline = time.monotonic() + 60
    while not set(cache.glob("*.lock")) - locks and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    comfy.request("/interrupt", {})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, history = comfy.request(f"/history/{body['prompt_id']}")
        if history and body["prompt_id"] in history:
            break
        time.sleep(0.2)
    messages = [kind for kind, _ in history[body["prompt_id"]]["status"]["messages"]]
    assert "execution_interrupted" in messages
    assert comfy.quantize_runs() == (built, hits), "an interrupted quantization must not produce a model"
    image, _ = comfy.image(t2i_graph(quantize={}, prefix="after_interrupt"))
    assert image.shape == (64, 64, 3)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two 8-bit images."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _cache_entry_method(comfy: Comfy) -> dict[str, Any]:
    """The ``fpq_method`` summary in the header of the newest fpq cache entry (what the node built last)."""
    from fpq_plugin.io import read_header

    entries = sorted((comfy.base / "models" / "fpq_cache").glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    assert entries, "the node wrote no cache entry"
    return read_header(entries[-1]).extra["fpq_method"]


def test_w4_recipes(comfy: Comfy) -> None:
    """w4a8 calibrated with fpq's method on ComfyUI's sampler (quality fast), and w4a16 without a CLIP."""
    plain, _ = comfy.image(t2i_graph(prefix="plain"))
    w4a8, t_w4a8 = comfy.image(t2i_graph(quantize={"recipe": "w4a8"}, prefix="w4a8"))
    w4a8_report = comfy.node_reports()[-1]
    method = _cache_entry_method(comfy)
    graph = t2i_graph(quantize={"recipe": "w4a16"}, prefix="w4a16")
    del graph["10"]["inputs"]["clip"]  # weight-only with quality fast: no calibration, no CLIP
    w4a16, t_w4a16 = comfy.image(graph)
    w4a16_report = comfy.node_reports()[-1]
    for name, image, seconds, report in (("w4a8", w4a8, t_w4a8, w4a8_report), ("w4a16", w4a16, t_w4a16, w4a16_report)):
        mean, peak = diff(plain, image)
        print(
            f"\n{name} ({report['quality']}): graph {seconds:.1f} s, node {report['total_s']:.1f} s; UNet "
            f"{report['float_mib']} -> {report['quantized_mib']} MiB; image diff mean {mean:.2f} max {peak}, PSNR vs "
            f"float {psnr(plain, image):.1f} dB"
        )
        assert not report["hit"]
        assert 0 < mean < 20, f"a {name} image should differ from full precision, moderately"
        fp32_mib = report["float_mib"] * 4 / comfy.float_bytes_per_weight()
        assert report["quantized_mib"] < 0.2 * fp32_mib, f"{name} should store about 1/8 of fp32 bytes"
    print(f"w4a8 fast: sampling {method['calibration_s']:.1f} s, method {method['method_s']:.1f} s "
          f"{method['phases_s']}; formats {method['formats']}")  # fmt: skip
    assert method["preset"] == "fast" and method["rounding"] == "nearest"
    assert method["calls"] == 4 * 4, "4 prompts x 4 steps of ComfyUI's sampler, all kept"
    assert set(method["formats"]) <= {"e2m1", "e3m0", "e1m2"} and sum(method["formats"].values()) == 118


@pytest.mark.slow
def test_standard_quality_learns_the_rounding(comfy: Comfy) -> None:
    """Quality standard: search plus learned rounding; it must beat round-to-nearest on the same model and data.

    Slow: the method's learned rounding takes tens of minutes on a CPU even for the test UNet (it is sized for a
    GPU), so this runs with the slow tests.
    """
    plain, _ = comfy.image(t2i_graph(prefix="plain"))
    learned, _ = comfy.image(
        t2i_graph(quantize={"recipe": "w4a8", "quality": "standard"}, prefix="w4a8_std"), timeout=3600
    )
    report = comfy.node_reports()[-1]
    method = _cache_entry_method(comfy)
    print(
        f"\nw4a8 standard: node {report['total_s']:.1f} s (sampling {method['calibration_s']:.1f} s, {method['calls']} "
        f"calls kept; method {method['method_s']:.1f} s {method['phases_s']}); {method['units_learned']}/"
        f"{method['units']} units kept learned rounding; summed unit-output error: nearest "
        f"{method['unit_error_nearest']:.4g} -> {method['unit_error_kept']:.4g}; PSNR vs float "
        f"{psnr(plain, learned):.1f} dB"
    )
    # The cache entry records what ran; learned rounding has to beat round-to-nearest on the same model and data.
    assert not report["hit"] and report["quality"] == "standard"
    assert method["preset"] == "standard" and method["rounding"] == "learned" and method["rounding_iters"] > 0
    assert method["calls"] == 8 * 4, "8 prompts x 4 kept steps of ComfyUI's sampler"
    assert method["units_learned"] > method["units"] // 2, "learned rounding should beat nearest on most units"
    assert method["unit_error_kept"] < 0.9 * method["unit_error_nearest"], "learning should cut the unit error"


def test_comfy_quant_export_loads_in_plain_comfyui(comfy: Comfy) -> None:
    if not (Path(COMFYUI_PATH) / "comfy" / "quant_ops.py").is_file():
        pytest.skip("this ComfyUI predates comfy_quant checkpoints (needs >= 0.8)")
    if not (comfy.base / "models" / "diffusion_models" / COMFY_FP8_UNET).is_file():  # see make_comfy_test_models
        pytest.skip("ComfyUI's python lacks comfy-kitchen, without which ComfyUI 0.8 cannot load comfy_quant files")
    from safetensors import safe_open

    plain, _ = comfy.image(t2i_graph(prefix="plain"))
    quant, _ = comfy.image(t2i_graph(quantize={}, prefix="w8a8"))
    save = {k: v for k, v in t2i_graph(quantize={}).items() if k in ("1", "2", "10")}
    save["20"] = {"class_type": "FPQSaveQuantizedUNet",
                  "inputs": {"model": ["10", 0], "filename_prefix": "native", "format": "comfy_quant"}}  # fmt: skip
    entry = comfy.run(save)
    assert entry["status"]["status_str"] == "success", _error_text(entry)
    files = sorted((comfy.base / "models" / "diffusion_models").glob("native_*.safetensors"))
    assert files, "the comfy_quant export wrote no file into models/diffusion_models"
    assert not (comfy.base / "models" / "unet").exists(), "nothing goes into ComfyUI's legacy models/unet folder"
    with safe_open(str(files[-1]), framework="pt") as fh:
        keys = list(fh.keys())
        markers = [k for k in keys if k.endswith(".comfy_quant")]
        fp8 = [k for k in markers if fh.get_tensor(k[: -len("comfy_quant")] + "weight").dtype == torch_fp8()]
        assert "_quantization_metadata" in fh.metadata()
    assert markers and len(fp8) == len(markers), "every comfy_quant layer should hold a float8_e4m3fn weight"
    assert not any(k.endswith(("weight_codes", "weight_scale_2")) for k in keys), "no fpq-only tensors"

    # ComfyUI's own UNETLoader (no fpq node in the graph) loads it as a mixed-precision model and generates.
    log_before = len(comfy.log.read_text())
    graph = t2i_graph(prefix="native")
    graph["1"]["inputs"]["unet_name"] = files[-1].name
    native, seconds = comfy.image(graph)
    log = comfy.log.read_text()[log_before:]
    assert "unet missing" not in log and "unet unexpected" not in log, log[-3000:]
    size_mib = files[-1].stat().st_size / 2**20
    float_mib = (comfy.base / "models" / "diffusion_models" / UNET).stat().st_size / 2**20
    to_fpq, _ = diff(quant, native)
    to_plain, peak = diff(plain, native)
    print(
        f"\ncomfy_quant export {files[-1].name}: {size_mib:.1f} MiB (fp16 {float_mib:.1f} MiB), {len(markers)} FP8 "
        f"Linear layers; UNETLoader + generate {seconds:.1f} s; image vs fpq w8a8 mean {to_fpq:.2f}, vs float mean "
        f"{to_plain:.2f} max {peak} (PSNR {psnr(plain, native):.1f} dB)"
    )
    assert size_mib < 0.85 * float_mib, "the FP8 Linear weights should make the file smaller than fp16"
    assert 0 < to_plain < 8, "the natively loaded FP8 model should be close to, not equal to, the float model"


def torch_fp8() -> Any:
    import torch

    return torch.float8_e4m3fn


def test_interrupt_during_the_method_stops_it_quickly(comfy: Comfy) -> None:
    built, hits = comfy.quantize_runs()
    cache = comfy.base / "models" / "fpq_cache"
    entries = set(cache.glob("*.safetensors"))
    locks = set(cache.glob("*.lock"))
    # w8a16 at quality best: the node samples 16 prompts x 16 steps, logs that the method starts, and the method
    # searches every layer's scales and then learns the rounding of every block for 2000 iterations: minutes on a
    # CPU and still many seconds on a GPU, where the fast preset may be done before a fixed wait ends.
    # Interrupt two seconds after that line, inside the method.
    log_start = len(comfy.log.read_text())
    graph = t2i_graph(quantize={"recipe": "w8a16", "quality": "best"}, prefix="interrupted_method")
    status, body = comfy.submit(graph)
    assert status == 200
    deadline = time.monotonic() + 600
    while "running the best method" not in comfy.log.read_text()[log_start:] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(cache.glob("*.lock")) - locks, "the node should hold the cache entry's lock while it builds"
    assert "running the best method" in comfy.log.read_text()[log_start:], "calibration sampling did not finish"
    time.sleep(2)
    comfy.request("/interrupt", {})
    asked = time.monotonic()
    history: dict = {}
    while time.monotonic() < asked + 120:
        _, history = comfy.request(f"/history/{body['prompt_id']}")
        if history and body["prompt_id"] in history:
            break
        time.sleep(0.2)
    stopped_after = time.monotonic() - asked
    print(f"\ninterrupted inside the method: stopped {stopped_after:.1f} s after the request")
    messages = [kind for kind, _ in history[body["prompt_id"]]["status"]["messages"]]
    assert "execution_interrupted" in messages
    assert stopped_after < 60, "the method should notice the cancel button between layers"
    assert comfy.quantize_runs() == (built, hits) and set(cache.glob("*.safetensors")) == entries
