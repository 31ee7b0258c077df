"""The procedural scenes: reproducible, and every label agrees with what is drawn."""

from __future__ import annotations

import torch

from fpq_plugin.reference.scenes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    caption_vocabulary,
    render_scenes,
    sample_scenes,
    scene_labels,
)


def test_same_seed_same_scenes_and_pixels() -> None:
    a, b = sample_scenes(32, 7), sample_scenes(32, 7)
    assert a == b
    assert torch.equal(render_scenes(a, 32), render_scenes(b, 32))
    assert sample_scenes(32, 8) != a


def test_captions_name_the_labels() -> None:
    for scene in sample_scenes(200, 0):
        words = scene.caption.replace(",", "").split()
        assert list(COLORS)[scene.color] in words
        assert list(BACKGROUNDS)[scene.background] in words
        assert any(w.startswith(ATTRIBUTES["shape"][scene.shape]) for w in words)
        if scene.count == 0:
            assert ATTRIBUTES["position"][scene.position] in words
            assert ATTRIBUTES["size"][scene.size] in words
        else:
            assert ATTRIBUTES["count"][scene.count] in words
        assert set(words) <= set(caption_vocabulary().split())


def test_pixels_agree_with_labels() -> None:
    scenes = sample_scenes(300, 1)
    images = render_scenes(scenes, 64)
    labels = scene_labels(scenes)
    assert images.shape == (300, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    bg = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32)[labels["background"]] / 255
    fg = torch.tensor(list(COLORS.values()), dtype=torch.float32)[labels["color"]] / 255
    corner = images[:, :, 0, 0]
    assert torch.allclose(corner, bg, atol=1e-6)  # objects never reach the corner pixel
    is_fg = (images - fg.view(-1, 3, 1, 1)).abs().amax(dim=1) < 1e-4  # fully covered pixels
    area = is_fg.float().mean(dim=(1, 2))
    assert (area > 0).all()
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    for i, scene in enumerate(scenes):
        if scene.count != 0:
            continue
        cx = float((xs * is_fg[i]).sum() / is_fg[i].sum()) / 64
        cy = float((ys * is_fg[i]).sum() / is_fg[i].sum()) / 64
        px, py = POSITIONS[ATTRIBUTES["position"][scene.position]]
        # Centroid near the named position (jitter 0.04; a triangle's centroid sits a little low).
        assert abs(cx - px) < 0.07 and abs(cy - py) < 0.09, (scene.caption, cx, cy)
    single = labels["count"] == 0
    large = single & (labels["size"] == 1)
    small = single & (labels["size"] == 0)
    assert area[large].mean() > 2 * area[small].mean()
