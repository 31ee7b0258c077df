"""Tiny, complete Stable Diffusion pipelines built from configs, for end-to-end tests without the model hub.

The pipelines are real ``diffusers`` pipelines (``StableDiffusionPipeline`` for SD1.x and SD2.x,
``StableDiffusionXLPipeline``) whose
every component is randomly initialised from a small config: the tiny UNets of
:mod:`fpq_plugin.models.unet_configs`, tiny CLIP text encoders, a tiny VAE and a real ``CLIPTokenizer`` loaded from a
small byte-level BPE vocabulary written to disk. A 4-step generation of a 32x32 image takes well under a second on
a laptop CPU, so quantization can be tested through the same code path users run (``pipe(prompt)``,
``save_pretrained``/``from_pretrained``).

diffusers and transformers are imported inside functions only, so importing this module is cheap.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fpq_plugin.errors import RecipeError
from fpq_plugin.models.unet_configs import PREDICTION_TYPES, unet_config

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import DiffusionPipeline

__all__ = [
    "PIPELINE_KINDS",
    "TEXT_MAX_LENGTH",
    "TEXT_VOCAB_SIZE",
    "build_tiny_pipeline",
    "save_tiny_pipeline",
    "sd_scheduler",
    "write_tiny_tokenizer",
]

PIPELINE_KINDS: tuple[str, ...] = ("sd15", "sd2", "sdxl")
_UNET_OF_KIND = {"sd15": "tiny", "sd2": "tiny-sd2", "sdxl": "tiny-xl"}
SCHEDULERS: tuple[str, ...] = ("ddim", "euler")

#: Vocabulary size of the tiny tokenizer and text encoders (ids 0..999; the last two are bos and eos, as in CLIP).
TEXT_VOCAB_SIZE = 1000
#: Context length; kept at CLIP's 77 so prompt handling (truncation, padding) matches real pipelines.
TEXT_MAX_LENGTH = 77
_TEXT_HIDDEN = 32
_TEXT_HIDDEN_2 = 48  # SDXL's second encoder: wider than the first, as OpenCLIP bigG (1280) is wider than CLIP-L (768)
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
_END_OF_WORD = "</w>"

# Small corpus the tokenizer's merges are learned from: words that show up in test prompts and calibration-style
# prompts, so they encode to one or a few tokens instead of one token per letter (as with real CLIP).
_CORPUS = """
a an the of and with in on at to for from by is are this that it its as or over under near
red green blue yellow orange purple pink black white gray grey brown gold silver
square circle triangle cube sphere star line dot shape color colour light dark bright
photo photograph picture painting drawing illustration portrait landscape render art style
cat dog bird horse fish car house tree flower mountain river sea ocean sky cloud sun moon city
street forest beach garden field road bridge castle tower window door table chair book
man woman person people child girl boy face hand eye hair smile
beautiful detailed high quality realistic cinematic lighting sharp focus digital oil
watercolor sketch fantasy futuristic old new small large big little tiny huge
standing sitting walking running flying sunset sunrise night day morning evening winter summer
an astronaut riding a horse on mars a photo of a cat sitting on a table
a red square on a white background a blue circle a green triangle
"""

# Default tokenizer directory, shared by every pipeline built in this process: the files are identical for every
# seed, and the directory must outlive the pipelines built from it (removed at interpreter exit).
_DEFAULT_TOKENIZER_DIR: str | None = None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-unicode table: maps every byte to a printable character (byte-level BPE alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1))
        + list(range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _learn_merges(corpus: str, max_merges: int) -> list[tuple[str, str]]:
    """Learn byte-level BPE merges from ``corpus`` (classic Sennrich et al. algorithm, deterministic ties).

    Args:
        corpus: Whitespace-separated lowercase ASCII words (ASCII letters map to themselves in the byte alphabet).
        max_merges: Upper bound on the number of merges.

    Returns:
        Merges in rank order; stops early when every corpus word is a single token.
    """
    words: Counter[tuple[str, ...]] = Counter()
    for word in corpus.split():
        symbols = list(word)
        symbols[-1] += _END_OF_WORD
        words[tuple(symbols)] += 1

    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        # Most frequent pair; ties broken lexicographically so the vocabulary never depends on dict order.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def _tiny_vocab(corpus: str = _CORPUS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build the tiny CLIP-style vocabulary and merges.

    Layout follows real CLIP: 256 byte characters, the same with ``</w>``, merged tokens, then (padding to
    :data:`TEXT_VOCAB_SIZE`) unused tokens, and finally ``<|startoftext|>`` and ``<|endoftext|>`` as the two highest
    ids. eos being the highest id matters: ``CLIPTextModel`` pools the hidden state at the eos position.
    """
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + _END_OF_WORD for c in alphabet]
    budget = TEXT_VOCAB_SIZE - len(tokens) - 2
    merges = _learn_merges(corpus, budget)
    seen = set(tokens)
    for left, right in merges:
        token = left + right
        if token not in seen:  # a merge can recreate an existing token; keep ids unique
            tokens.append(token)
            seen.add(token)
    tokens += [f"<|unused{i}|>" for i in range(TEXT_VOCAB_SIZE - 2 - len(tokens))]
    tokens += [_BOS, _EOS]
    assert len(tokens) == TEXT_VOCAB_SIZE  # internal invariant of this builder, not user input
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_tiny_tokenizer(tokenizer_dir: str | os.PathLike[str], corpus: str | None = None) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the tiny byte-level BPE tokenizer.

    Args:
        tokenizer_dir: Directory to write into (created if missing).
        corpus: Whitespace-separated lowercase words the merges are learned from; defaults to the test corpus.

    Returns:
        The directory, loadable with ``CLIPTokenizer.from_pretrained``.
    """
    path = Path(tokenizer_dir)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = _tiny_vocab(_CORPUS if corpus is None else corpus)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # The header line is part of the format: CLIP's merges.txt starts with it and loaders skip it.
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _default_tokenizer_dir() -> str:
    global _DEFAULT_TOKENIZER_DIR
    if _DEFAULT_TOKENIZER_DIR is None or not os.path.isdir(_DEFAULT_TOKENIZER_DIR):
        _DEFAULT_TOKENIZER_DIR = tempfile.mkdtemp(prefix="fpq-tiny-tokenizer-")
        atexit.register(shutil.rmtree, _DEFAULT_TOKENIZER_DIR, ignore_errors=True)
    return _DEFAULT_TOKENIZER_DIR


def _load_tokenizer(tokenizer_dir: str | os.PathLike[str] | None, pad_token: str) -> Any:
    from transformers import CLIPTokenizer

    directory = write_tiny_tokenizer(tokenizer_dir if tokenizer_dir is not None else _default_tokenizer_dir())
    return CLIPTokenizer.from_pretrained(
        str(directory),
        model_max_length=TEXT_MAX_LENGTH,
        pad_token=pad_token,
        local_files_only=True,
    )


def _text_config(
    hidden_act: str, projection_dim: int, eos_id: int, bos_id: int, pad_id: int, hidden_size: int = _TEXT_HIDDEN
) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=TEXT_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TEXT_MAX_LENGTH,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        projection_dim=projection_dim,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    # Two blocks -> 2x spatial downsampling (vae_scale_factor 2): the tiny UNets' 16x16 latents decode to 32x32.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def sd_scheduler(name: str, prediction_type: str = "epsilon") -> Any:
    """A fresh ``"ddim"`` or ``"euler"`` scheduler with Stable Diffusion's training noise schedule.

    ``prediction_type`` is ``"epsilon"`` (SD1.x, SDXL) or ``"v_prediction"`` (SD2.x at 768 pixels).
    """
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    # The beta schedule of SD1.x/SDXL, so timesteps and noise levels look like the real models'.
    common: dict[str, Any] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction_type,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }
    if name == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)
    return EulerDiscreteScheduler(**common)


def build_tiny_pipeline(
    kind: str = "sd15",
    seed: int = 0,
    scheduler: str = "ddim",
    tokenizer_dir: str | os.PathLike[str] | None = None,
) -> DiffusionPipeline:
    """Build a tiny, randomly initialised, fully working Stable Diffusion pipeline.

    Args:
        kind: ``"sd15"`` (``StableDiffusionPipeline`` around the ``"tiny"`` UNet), ``"sd2"`` (the same pipeline
            class around the ``"tiny-sd2"`` UNet, with a gelu text encoder as OpenCLIP ViT-H and a v-prediction
            scheduler, as SD2.x) or ``"sdxl"`` (``StableDiffusionXLPipeline`` with two text encoders around the
            ``"tiny-xl"`` UNet).
        seed: Seed of every component's weights; the same seed gives identical pipelines. The global torch RNG is
            left untouched.
        scheduler: ``"ddim"`` (``DDIMScheduler``) or ``"euler"`` (``EulerDiscreteScheduler``).
        tokenizer_dir: Where to write the tokenizer files; defaults to a per-process temporary directory that is
            removed at exit.

    Returns:
        The pipeline on CPU in float32. Its default image size is 32x32 pixels.

    Raises:
        RecipeError: ``kind`` or ``scheduler`` is unknown.
    """
    if kind not in PIPELINE_KINDS:
        raise RecipeError(f"unknown tiny pipeline kind {kind!r}; valid kinds are {', '.join(PIPELINE_KINDS)}")
    if scheduler not in SCHEDULERS:
        raise RecipeError(f"unknown scheduler {scheduler!r}; valid schedulers are {', '.join(SCHEDULERS)}")

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    # SD1.5 pads with eos; SDXL's second tokenizer pads with "!" (id 0), as the released tokenizers do.
    tokenizer = _load_tokenizer(tokenizer_dir, pad_token=_EOS)
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert (bos_id, eos_id) == (TEXT_VOCAB_SIZE - 2, TEXT_VOCAB_SIZE - 1), (bos_id, eos_id)  # internal invariant

    unet_name = _UNET_OF_KIND[kind]
    config = unet_config(unet_name)
    # Build every component under one private, seeded RNG: deterministic weights, caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(config)
        vae = _vae()
        # SD1.x's CLIP ViT-L uses quick_gelu; SD2.x's OpenCLIP ViT-H uses gelu.
        act = "gelu" if kind == "sd2" else "quick_gelu"
        text_encoder = CLIPTextModel(_text_config(act, _TEXT_HIDDEN, eos_id, bos_id, eos_id))
        if kind == "sdxl":
            tokenizer_2 = _load_tokenizer(tokenizer_dir, pad_token="!")
            # Pooled text_embeds width must fill the UNet's add-embedding input next to the 6 time ids.
            pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            # OpenCLIP bigG (SDXL's second encoder) uses gelu.
            text_encoder_2 = CLIPTextModelWithProjection(
                _text_config("gelu", pooled_dim, eos_id, bos_id, tokenizer_2.pad_token_id, _TEXT_HIDDEN_2)
            )
    sched = sd_scheduler(scheduler, PREDICTION_TYPES[unet_name])

    modules: list[torch.nn.Module] = [unet, vae, text_encoder]
    if kind != "sdxl":
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        modules.append(text_encoder_2)
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=sched,
            add_watermarker=False,
        )
    for module in modules:
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(path: str | os.PathLike[str], kind: str = "sd15", seed: int = 0) -> Path:
    """Build a tiny pipeline and save it in the diffusers folder layout.

    Args:
        path: Output folder; reloads offline with ``DiffusionPipeline.from_pretrained(path)``.
        kind: See :func:`build_tiny_pipeline`.
        seed: See :func:`build_tiny_pipeline`.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        RecipeError: ``kind`` is unknown.
    """
    pipe = build_tiny_pipeline(kind, seed=seed)
    out = Path(path)
    pipe.save_pretrained(out)
    return out
