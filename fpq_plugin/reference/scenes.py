"""Procedurally drawn, captioned scenes: the training data of fpq's reference models.

No dataset can be downloaded where fpq is developed, so the reference models learn from scenes this module draws:
one to three flat-coloured shapes on a plain background, each scene with an English caption and integer labels for
every attribute the caption names. The labels let the evaluation harness check whether a generated image follows
its prompt (an attribute classifier trained on the same scenes reads them back).

A scene is decided on the CPU from a seeded :class:`random.Random` (so a seed gives the same scenes on every machine) and
rendered on any device in one batched pass: each shape is a signed-distance function evaluated on the pixel grid,
anti-aliased over one pixel.

Attributes and their values (label = index in the tuple):

- ``color``: :data:`COLORS`; ``shape``: :data:`SHAPES`; ``background``: :data:`BACKGROUNDS`
- ``count``: one, two or three objects (label 0, 1, 2)
- ``position``: :data:`POSITIONS` for a single object, ``"scattered"`` (the last label) for two or three
- ``size``: small or large for a single object; several objects are always small
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "COLORS",
    "COUNTS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Scene",
    "caption_vocabulary",
    "render_scenes",
    "sample_scenes",
    "scene_labels",
]

#: Object colours (name -> sRGB in 0..255). Chosen far apart so a small classifier and a human agree on them.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "orange": (245, 135, 25),
    "purple": (140, 55, 190),
    "pink": (250, 135, 195),
    "cyan": (40, 205, 215),
}
#: Background colours; every object colour stands out against each of them.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 242),
    "black": (22, 22, 26),
    "gray": (125, 125, 128),
    "beige": (215, 200, 165),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "ring")
#: Where a single object sits, and its centre in image-relative coordinates (x right, y down).
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
_POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
COUNTS: tuple[str, ...] = ("one", "two", "three")
SIZES: dict[str, float] = {"small": 0.12, "large": 0.21}  # shape "radius" as a fraction of the image side

#: Every attribute and its value names, in label order.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "background": tuple(BACKGROUNDS),
    "count": COUNTS,
    "position": (*POSITIONS, "scattered"),
    "size": tuple(SIZES),
}

_SINGLE_TEMPLATES = (
    "a {size} {color} {shape} {where} on a {background} background",
    "{size} {color} {shape} {where}, {background} background",
)
_MANY_TEMPLATES = (
    "{count} {color} {shape}s on a {background} background",
    "{count} small {color} {shape}s, {background} background",
)


@dataclass(frozen=True)
class Scene:
    """One scene: what is drawn (labels, object centres and radius) and its caption."""

    caption: str
    color: int
    shape: int
    background: int
    count: int  # label: number of objects - 1
    position: int
    size: int
    centers: tuple[tuple[float, float], ...]
    radius: float

    def labels(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in ATTRIBUTES}


def _uniform(generator: random.Random, low: float = 0.0, high: float = 1.0) -> float:
    return generator.uniform(low, high)


def _choice(generator: random.Random, n: int) -> int:
    return generator.randrange(n)


def _scattered_centers(generator: random.Random, count: int, radius: float) -> tuple[tuple[float, float], ...]:
    """Centres of ``count`` non-overlapping objects inside the frame (rejection sampling; always terminates
    because three small objects fit easily)."""
    margin = radius * 1.3
    centers: list[tuple[float, float]] = []
    while len(centers) < count:
        c = (_uniform(generator, margin, 1 - margin), _uniform(generator, margin, 1 - margin))
        if all(math.dist(c, o) > 2.6 * radius for o in centers):
            centers.append(c)
    return tuple(centers)


def sample_scenes(n: int, seed: int | random.Random) -> list[Scene]:
    """Decide ``n`` random scenes (half single objects, half groups of two or three).

    Args:
        n: Number of scenes.
        seed: An integer seed or a :class:`random.Random` to draw from (advanced in place). Python's generator is
            used, not torch's: deciding a scene takes a dozen scalar draws, which are 100x cheaper there, and its
            sequence is the same on every platform.
    """
    generator = seed if isinstance(seed, random.Random) else random.Random(seed)
    scenes = []
    color_names, bg_names = list(COLORS), list(BACKGROUNDS)
    for _ in range(n):
        color, shape, background = _choice(generator, len(COLORS)), _choice(generator, len(SHAPES)), _choice(
            generator, len(BACKGROUNDS)
        )
        count = 0 if _uniform(generator) < 0.5 else 1 + _choice(generator, 2)
        words = {"color": color_names[color], "shape": SHAPES[shape], "background": bg_names[background]}
        if count == 0:
            position = _choice(generator, len(POSITIONS))
            size = _choice(generator, len(SIZES))
            size_name, where = list(SIZES)[size], list(POSITIONS)[position]
            radius = SIZES[size_name] * _uniform(generator, 0.9, 1.1)
            cx, cy = POSITIONS[where]
            centers: tuple[tuple[float, float], ...] = (
                (cx + _uniform(generator, -0.04, 0.04), cy + _uniform(generator, -0.04, 0.04)),
            )
            template = _SINGLE_TEMPLATES[_choice(generator, len(_SINGLE_TEMPLATES))]
            caption = template.format(size=size_name, where=_POSITION_PHRASES[where], **words)
        else:
            position, size = len(POSITIONS), 0  # "scattered", "small"
            radius = SIZES["small"] * _uniform(generator, 0.8, 0.95)
            centers = _scattered_centers(generator, count + 1, radius)
            template = _MANY_TEMPLATES[_choice(generator, len(_MANY_TEMPLATES))]
            caption = template.format(count=COUNTS[count], **words)
        scenes.append(Scene(caption, color, shape, background, count, position, size, centers, radius))
    return scenes


def scene_labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Labels of ``scenes`` as one int64 tensor per attribute (keys and order of :data:`ATTRIBUTES`)."""
    return {name: torch.tensor([getattr(s, name) for s in scenes], dtype=torch.long) for name in ATTRIBUTES}


def _signed_distance(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance (negative inside) of each shape, in image-relative units.

    Radii are scaled per shape so that all shapes of one size cover a similar area.
    """
    circle = torch.sqrt(dx * dx + dy * dy) - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.86 * r
    diamond = (dx.abs() + dy.abs()) / math.sqrt(2) - 0.86 * r
    ring = (torch.sqrt(dx * dx + dy * dy) - 0.72 * r).abs() - 0.3 * r
    # Equilateral triangle, apex up: the largest of the three edge-plane distances (inradius = circumradius / 2).
    tr = 1.25 * r
    triangle = torch.maximum(torch.maximum(dy, -0.866 * dx - 0.5 * dy), 0.866 * dx - 0.5 * dy) - 0.5 * tr
    dist = torch.stack([circle, square, triangle, diamond, ring])  # order of SHAPES
    return dist.gather(0, shape.expand_as(circle).unsqueeze(0)).squeeze(0)


def render_scenes(scenes: list[Scene], size: int = 64, device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw ``scenes`` as an ``(n, 3, size, size)`` float32 batch in [0, 1] on ``device``."""
    n = len(scenes)
    dev = torch.device(device)
    colors = torch.tensor(list(COLORS.values()), dtype=torch.float32, device=dev) / 255
    backgrounds = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32, device=dev) / 255
    max_objects = len(COUNTS)
    centers = torch.full((n, max_objects, 2), 10.0)  # unused slots sit far outside the frame
    for i, s in enumerate(scenes):
        centers[i, : len(s.centers)] = torch.tensor(s.centers)
    centers = centers.to(dev)
    radius = torch.tensor([s.radius for s in scenes], device=dev).view(n, 1, 1, 1)
    shape = torch.tensor([s.shape for s in scenes], device=dev).view(n, 1, 1, 1)

    coords = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) / size
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    dx = gx.view(1, 1, size, size) - centers[..., 0].view(n, max_objects, 1, 1)
    dy = gy.view(1, 1, size, size) - centers[..., 1].view(n, max_objects, 1, 1)
    dist = _signed_distance(shape.expand(n, max_objects, 1, 1), dx, dy, radius).amin(dim=1, keepdim=True)
    alpha = (0.5 - dist * size).clamp(0, 1)  # one pixel of anti-aliasing across the edge

    fg = colors[torch.tensor([s.color for s in scenes], device=dev)].view(n, 3, 1, 1)
    bg = backgrounds[torch.tensor([s.background for s in scenes], device=dev)].view(n, 3, 1, 1)
    return bg * (1 - alpha) + fg * alpha


def caption_vocabulary() -> str:
    """Every word a caption can contain (the reference tokenizer's corpus)."""
    words = {"a", "on", "the", "at", "in", "of", "background", "small", "large"}
    words |= set(COLORS) | set(BACKGROUNDS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(COUNTS)
    for phrase in _POSITION_PHRASES.values():
        words |= set(phrase.split())
    return " ".join(sorted(words))
