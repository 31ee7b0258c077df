"""Train fpq's reference models on procedurally drawn scenes (one GPU, runs of at most ten minutes, resumable).

Phases, each with its own wall-clock budget so a run fits a lease:

- ``judge``: the attribute classifier (:class:`fpq_plugin.reference.models.AttributeClassifier`).
- ``vae``: the ``AutoencoderKL`` (64x64x3 -> 16x16x4); sets ``scaling_factor`` from the latents' std, as SD does.
- ``t2i``: the CLIP text encoder and the ``UNet2DConditionModel`` together, VAE frozen; epsilon prediction with
  epsilon prediction (plain MSE by default), 10% empty captions for classifier-free guidance, EMA weights.
- ``uncond``: the pixel-space ``UNet2DModel`` (32x32).

Example (what made the shipped weights; see ``fpq_plugin/reference/weights/MODEL_CARD.md``)::

    python training/train_reference.py --out runs/r1 --phases judge,vae,t2i,uncond
    python training/train_reference.py --out runs/r2 --resume runs/r1 --phases t2i --minutes-t2i 8

``--fresh uncond`` retrains the unconditional model from scratch (e.g. after changing its scheduler's
``prediction_type`` to ``v_prediction``, which the loss follows). ``--fresh t2i-unet`` starts the text-to-image
UNet from scratch while the VAE and the text encoder continue from ``--resume``; with ``--unet-init gaussian`` its
weights start normally distributed instead of uniform (why: ``fpq_plugin.reference.models.build_t2i_unet``)::

    python training/train_reference.py --out runs/g1 --resume fpq_plugin/reference/weights --phases t2i \
        --fresh t2i-unet --unet-init gaussian --minutes-t2i 9
``--resume`` continues from a previous output folder: models not trained in this run are copied from it, trained
ones start from its (EMA) weights with a fresh optimizer; the loss log is extended. The output folder holds the
diffusers folders ``scenes-t2i`` and ``scenes-uncond`` (fp16 safetensors), ``scenes-judge.safetensors``,
``training_log.json`` (losses, steps, GPU seconds, checks) and ``samples.safetensors`` (images made at the end).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fpq_plugin.reference.models import (  # noqa: E402
    UNET_INITS,
    AttributeClassifier,
    build_t2i_pipeline,
    build_t2i_unet,
    build_uncond_pipeline,
    load_classifier,
    load_t2i_pipeline,
    load_uncond_pipeline,
)
from fpq_plugin.reference.scenes import ATTRIBUTES, render_scenes, sample_scenes, scene_labels  # noqa: E402

HELD_OUT_SEED = 1_000_003  # scenes used for checks; training draws from seeds below it


class EMA:
    """Exponential moving average of a module's float parameters (kept in float32)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = [p for p in module.parameters()]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        # Ramp the decay up so the average is not dominated by the random initialisation in short runs.
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for p, s in zip(module.parameters(), self.shadow):
            p.copy_(s.to(p.dtype))


def lr_at(fraction: float, step: int, base: float, warmup: int = 200) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 10% over the run's time budget."""
    warm = min(1.0, (step + 1) / warmup)
    return base * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction))))


class Batches:
    """Endless training batches of rendered scenes (each batch from its own seed, so runs are reproducible)."""

    def __init__(self, batch: int, size: int, device: torch.device, seed: int) -> None:
        self.batch, self.size, self.device = batch, size, device
        self.rng = random.Random(seed)

    def next(self):
        scenes = sample_scenes(self.batch, self.rng)
        return scenes, render_scenes(scenes, self.size, self.device)


def _timed_loop(name: str, minutes: float, max_steps: int, step_fn, log: dict) -> None:
    """Call ``step_fn(step, fraction_of_budget)`` until the budget or ``max_steps``; log losses and timing."""
    budget = minutes * 60
    start = time.perf_counter()
    step, losses, running = 0, [], []
    while step < max_steps:
        fraction = (time.perf_counter() - start) / budget
        if fraction >= 1:
            break
        running.append(step_fn(step, fraction))
        step += 1
        if step % 50 == 0:
            loss = float(torch.stack(running).mean())
            running = []
            losses.append([step, loss])
            if step % 500 == 0:
                print(f"[{name}] step {step} loss {loss:.4f} {time.perf_counter() - start:.0f}s", flush=True)
    seconds = time.perf_counter() - start
    entry = log.setdefault(name, {"runs": []})
    previous = sum(r["steps"] for r in entry["runs"])
    entry["runs"].append(
        {
            "steps": step,
            "seconds": round(seconds, 1),
            "settings": {k: v for k, v in vars(log["_args"]).items() if not isinstance(v, Path)},
            "losses": [[previous + s, round(v, 5)] for s, v in losses],
        }
    )
    print(f"[{name}] {step} steps in {seconds:.0f}s", flush=True)


def train_judge(args, device, log) -> AttributeClassifier:
    model = AttributeClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    batches = Batches(args.batch, 64, device, seed=11)

    def step(i, fraction):
        scenes, images = batches.next()
        labels = {k: v.to(device) for k, v in scene_labels(scenes).items()}
        # Robust to what generators produce: blur (down/up-sampling) and noise on half the batch.
        half = images.shape[0] // 2
        blurred = F.interpolate(F.interpolate(images[:half], scale_factor=0.5, mode="bilinear"), scale_factor=2.0)
        blurred = (blurred + torch.randn_like(blurred) * 0.03).clamp(0, 1)
        images = torch.cat([blurred, images[half:]])
        for g in opt.param_groups:
            g["lr"] = lr_at(fraction, i, 2e-3, warmup=50)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images)
            loss = sum(F.cross_entropy(logits[k].float(), labels[k]) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    model.train()
    _timed_loop("judge", args.minutes_judge, args.max_steps, step, log)
    model.eval()
    scenes = sample_scenes(2048, HELD_OUT_SEED)
    with torch.no_grad():
        preds = predict(model, render_scenes(scenes, 64, device))
    labels = scene_labels(scenes)
    log["judge"]["held_out_accuracy"] = {k: float((preds[k].cpu() == labels[k]).float().mean()) for k in ATTRIBUTES}
    print("[judge] held-out accuracy", log["judge"]["held_out_accuracy"], flush=True)
    return model


@torch.no_grad()
def predict(model: AttributeClassifier, images: torch.Tensor, chunk: int = 512) -> dict[str, torch.Tensor]:
    outs = [model(images[i : i + chunk].float()) for i in range(0, images.shape[0], chunk)]
    return {k: torch.cat([o[k] for o in outs]).argmax(-1) for k in ATTRIBUTES}


def train_vae(args, pipe, device, log) -> None:
    vae = pipe.vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    batches = Batches(args.batch // 2, 64, device, seed=22)

    def step(i, fraction):
        _, images = batches.next()
        x = images * 2 - 1
        for g in opt.param_groups:
            g["lr"] = lr_at(fraction, i, 1e-3, warmup=100)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon.float(), x) + 0.5 * F.l1_loss(recon.float(), x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return loss.detach()

    _timed_loop("vae", args.minutes_vae, args.max_steps, step, log)
    vae.eval()
    images = render_scenes(sample_scenes(512, HELD_OUT_SEED), 64, device)
    with torch.no_grad():
        posterior = vae.encode(images * 2 - 1).latent_dist
        latents = posterior.sample()
        recon = ((vae.decode(posterior.mode()).sample + 1) / 2).clamp(0, 1)
    scaling = 1.0 / float(latents.float().std())
    vae.register_to_config(scaling_factor=scaling)
    mse = float((recon - images).pow(2).mean())
    log["vae"]["scaling_factor"] = scaling
    log["vae"]["held_out_psnr_db"] = 10 * math.log10(1 / mse)
    print(f"[vae] scaling_factor {scaling:.4f} held-out PSNR {log['vae']['held_out_psnr_db']:.2f} dB", flush=True)


def _encode_text(pipe, captions: list[str], device) -> torch.Tensor:
    ids = pipe.tokenizer(
        captions, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return pipe.text_encoder(ids)[0]


def _loss_weights(args, scheduler, timesteps: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample loss weights: 1 (plain epsilon MSE, as DDPM/SD) or min-SNR-gamma.

    min-SNR (min(SNR, gamma) / SNR for epsilon prediction) starves the low-noise steps in short runs: the first run
    used it and the unconditional model's samples kept visible pixel noise, so the default is plain MSE.
    """
    if args.loss_weighting == "none":
        return torch.ones_like(timesteps, dtype=torch.float32)
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / snr


def train_t2i(args, pipe, device, log) -> None:
    unet, text_encoder, vae = pipe.unet.to(device), pipe.text_encoder.to(device), pipe.vae.to(device).eval()
    vae.requires_grad_(False)
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_unet, ema_text = EMA(unet, 0.999), EMA(text_encoder, 0.999)
    scheduler = pipe.scheduler
    batches = Batches(args.batch, 64, device, seed=33 + 1000 * len(log.get("t2i", {}).get("runs", [])))
    scale = vae.config.scaling_factor

    def step(i, fraction):
        scenes, images = batches.next()
        captions = [s.caption if random.random() >= 0.1 else "" for s in scenes]  # CFG: 10% unconditional
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            latents = vae.encode(images * 2 - 1).latent_dist.sample().float() * scale
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        for g in opt.param_groups:
            g["lr"] = lr_at(fraction, i, args.lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cond = _encode_text(pipe, captions, device)
            pred = unet(noisy, t, encoder_hidden_states=cond).sample
        per_sample = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * _loss_weights(args, scheduler, t)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.update()
        ema_text.update()
        return per_sample.mean().detach()

    _timed_loop("t2i", args.minutes_t2i, args.max_steps, step, log)
    ema_unet.copy_to(unet)
    ema_text.copy_to(text_encoder)
    unet.eval()
    text_encoder.eval()


def train_uncond(args, pipe, device, log) -> None:
    unet = pipe.unet.to(device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    ema = EMA(unet, 0.999)
    scheduler = pipe.scheduler
    batches = Batches(args.batch, 32, device, seed=44 + 1000 * len(log.get("uncond", {}).get("runs", [])))

    def step(i, fraction):
        _, images = batches.next()
        x = images * 2 - 1
        noise = torch.randn_like(x)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x.shape[0],), device=device)
        for g in opt.param_groups:
            g["lr"] = lr_at(fraction, i, args.lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = unet(scheduler.add_noise(x, noise, t), t).sample
        target = scheduler.get_velocity(x, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
        per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * _loss_weights(args, scheduler, t)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.update()
        return per_sample.mean().detach()

    _timed_loop("uncond", args.minutes_uncond, args.max_steps, step, log)
    ema.copy_to(unet)
    unet.eval()


@torch.no_grad()
def check_t2i(pipe, judge, device, log, n: int, steps: int) -> torch.Tensor:
    """Generate ``n`` held-out prompts; log the judge's prompt accuracy. Returns the first 32 images."""
    scenes = sample_scenes(n, HELD_OUT_SEED + 1)
    images = []
    for i in range(0, n, 128):
        chunk = [s.caption for s in scenes[i : i + 128]]
        gen = torch.Generator(device).manual_seed(i)
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=5.0, generator=gen, output_type="pt").images
        images.append(out.float())
    images = torch.cat(images)
    preds = predict(judge, images)
    labels = scene_labels(scenes)
    acc = {k: float((preds[k].cpu() == labels[k]).float().mean()) for k in ATTRIBUTES}
    log.setdefault("checks", []).append({"t2i_prompt_accuracy": acc, "n": n, "steps": steps, "cfg": 5.0})
    print("[check] t2i prompt accuracy", {k: round(v, 3) for k, v in acc.items()}, flush=True)
    return images[:32].cpu()


@torch.no_grad()
def check_uncond(pipe, judge, device, log, n: int, steps: int) -> torch.Tensor:
    gen = torch.Generator(device).manual_seed(0)
    images = pipe(batch_size=n, num_inference_steps=steps, generator=gen, output_type="np").images
    images = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
    preds = predict(judge, F.interpolate(images, scale_factor=2.0, mode="bilinear"))
    counts = {k: torch.bincount(preds[k].cpu(), minlength=len(v)).tolist() for k, v in ATTRIBUTES.items()}
    log.setdefault("checks", []).append({"uncond_judged_histograms": counts, "n": n, "steps": steps})
    print("[check] uncond judged colours", counts["color"], "shapes", counts["shape"], flush=True)
    return images[:32].cpu()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--resume", type=Path)
    p.add_argument("--phases", default="judge,vae,t2i,uncond")
    p.add_argument("--fresh", default="", help="models to start from scratch despite --resume: uncond, t2i-unet")
    p.add_argument("--unet-init", choices=UNET_INITS, default="default", help="weights of a new t2i UNet")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--minutes-judge", type=float, default=0.5)
    p.add_argument("--minutes-vae", type=float, default=1.5)
    p.add_argument("--minutes-t2i", type=float, default=5.0)
    p.add_argument("--minutes-uncond", type=float, default=1.5)
    p.add_argument("--loss-weighting", choices=("none", "min-snr"), default="none")
    p.add_argument("--max-steps", type=int, default=10**9, help="cap per phase (smoke tests)")
    p.add_argument("--check-n", type=int, default=512, help="held-out prompts generated for the final check")
    p.add_argument("--check-steps", type=int, default=25)
    args = p.parse_args(argv)
    phases = [x for x in args.phases.split(",") if x]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    random.seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    log = json.loads((args.resume / "training_log.json").read_text()) if args.resume else {}
    log["_args"] = args  # recorded with each phase run; removed before writing
    log.setdefault("device", torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    started = time.perf_counter()

    judge = train_judge(args, device, log) if "judge" in phases else load_classifier(
        args.resume / "scenes-judge.safetensors"
    ).to(device)
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="fpq-ref-tok-"))
    fresh = {x for x in args.fresh.split(",") if x}
    if fresh - {"uncond", "t2i-unet"}:
        p.error(f"--fresh: unknown models {sorted(fresh - {'uncond', 't2i-unet'})}; choose from uncond, t2i-unet")
    if args.resume and (args.resume / "scenes-t2i").exists():
        new_unet = build_t2i_unet(init=args.unet_init) if "t2i-unet" in fresh else None
        t2i = load_t2i_pipeline(args.resume / "scenes-t2i", unet=new_unet)  # a new UNet: the old one is not read
        if new_unet is not None:
            log.pop("t2i", None)  # the loss log restarts with the new UNet
            log["t2i_unet_init"] = args.unet_init
        elif args.unet_init != "default":
            p.error("--unet-init sets the weights of a new t2i UNet: add --fresh t2i-unet, or start without --resume")
    else:
        t2i = build_t2i_pipeline(tokenizer_dir, unet_init=args.unet_init)
        log["t2i_unet_init"] = args.unet_init
    log.setdefault("t2i_unet_init", "default")  # the runs before this option started from the default
    if "vae" in phases:
        train_vae(args, t2i, device, log)
    if "t2i" in phases:
        train_t2i(args, t2i, device, log)
    t2i.to(device)
    uncond = (
        load_uncond_pipeline(args.resume / "scenes-uncond")
        if args.resume and (args.resume / "scenes-uncond").exists() and "uncond" not in fresh
        else build_uncond_pipeline()
    )
    if "uncond" in fresh:
        log.pop("uncond", None)
    if "uncond" in phases:
        train_uncond(args, uncond, device, log)
    uncond.to(device)

    samples = {
        "t2i": check_t2i(t2i, judge, device, log, args.check_n, args.check_steps),
        "uncond": check_uncond(uncond, judge, device, log, min(64, args.check_n), min(50, 2 * args.check_steps)),
    }
    log["gpu_seconds_total"] = round(log.get("gpu_seconds_total", 0) + time.perf_counter() - started, 1)

    from safetensors.torch import save_file

    judge_cpu = copy.deepcopy(judge).cpu().half()
    save_file({k: v.contiguous() for k, v in judge_cpu.state_dict().items()}, str(args.out / "scenes-judge.safetensors"))
    for name, pipe in (("scenes-t2i", t2i), ("scenes-uncond", uncond)):
        target = args.out / name
        shutil.rmtree(target, ignore_errors=True)
        pipe.to("cpu", torch.float16).save_pretrained(str(target), safe_serialization=True)
    save_file({k: v.contiguous() for k, v in samples.items()}, str(args.out / "samples.safetensors"))
    log.pop("_args")
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1))
    print(f"done in {time.perf_counter() - started:.0f}s -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
