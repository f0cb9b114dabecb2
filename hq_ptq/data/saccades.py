"""Still images turned into saccade DVS recordings: the part ``digits`` and ``fashion`` share.

Each image is upscaled, placed on a small emulated sensor and moved along three straight
saccades that form a triangle (as N-MNIST was recorded), and the video goes through the DVS
emulator. The dataset modules only say where their images come from and how they are split.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage

from hq_ptq.data.emulator import _videos_to_count_frames
from hq_ptq.data.registry import DatasetInfo, cached_arrays

logger = logging.getLogger(__name__)

#: Samples converted per emulator pass; part of the noise seeding, so keep it fixed.
CHUNK = 256
#: Duration of one saccade (N-MNIST's saccades last about 100 ms).
SACCADE_US = 100_000
#: Triangle corners as fractions of the travel: down-right, then up-right, then back left.
_CORNERS = np.array([[0.0, 0.0], [1.0, 0.5], [0.0, 1.0], [0.0, 0.0]])  # (dy, dx)


def saccade_path(steps_per_saccade: int, travel: float) -> np.ndarray:
    """Image offsets ``(3 * steps_per_saccade + 1, 2)`` as ``(dy, dx)`` pixels along the triangle."""
    pts = []
    for a, b in zip(_CORNERS[:-1], _CORNERS[1:], strict=True):
        f = np.arange(steps_per_saccade)[:, None] / steps_per_saccade
        pts.append(a + f * (b - a))
    pts.append(_CORNERS[-1:])
    return np.concatenate(pts) * travel


def _place(images: np.ndarray, size: int, oy: int, ox: int) -> np.ndarray:
    """Paste ``(N, h, w)`` images at integer offset (oy, ox) of a zero ``size x size`` canvas."""
    n, h, w = images.shape
    out = np.zeros((n, size, size), dtype=np.float32)
    y0, x0 = max(oy, 0), max(ox, 0)
    y1, x1 = min(oy + h, size), min(ox + w, size)
    if y1 > y0 and x1 > x0:
        out[:, y0:y1, x0:x1] = images[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    return out


def render_saccades(images: np.ndarray, size: int, path: np.ndarray, margin: int = 1) -> np.ndarray:
    """Video ``(S, N, size, size)`` of images moved with sub-pixel (bilinear) shifts along ``path``."""
    frames = np.empty((len(path), len(images), size, size), dtype=np.float32)
    for i, (dy, dx) in enumerate(path):
        iy, ix = int(np.floor(dy)), int(np.floor(dx))
        fy, fx = dy - iy, dx - ix
        acc = np.zeros((len(images), size, size), dtype=np.float32)
        for ay, wy in ((0, 1.0 - fy), (1, fy)):
            for ax, wx in ((0, 1.0 - fx), (1, fx)):
                wgt = wy * wx
                if wgt > 1e-9:
                    acc += np.float32(wgt) * _place(images, size, margin + iy + ay,
                                                    margin + ix + ax)
        frames[i] = acc
    return frames


def resize_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """Cubic-spline resize of ``(N, h, w)`` images in [0, 1] to ``image_size``, clipped to [0, 1]."""
    n, h, w = images.shape
    if (h, w) == (image_size, image_size):
        return images.astype(np.float32)
    out = ndimage.zoom(images.astype(np.float32), (1, image_size / h, image_size / w), order=3,
                       grid_mode=True, mode="grid-constant")
    return np.clip(out, 0.0, 1.0)


def images_to_saccade_frames(
    images: np.ndarray,
    *,
    T: int,
    size: int,
    image_size: int,
    threshold: float,
    steps_per_saccade: int,
    refractory_us: float,
    noise_rate_hz: float,
    eps: float,
    seed: int,
    scale: float = 1.0,
    max_count: int = 255,
) -> np.ndarray:
    """Convert still images into saccade DVS recordings binned into ``T`` equal-count frames.

    Args:
        images: ``(N, h, w)``; ``images * scale`` must be intensities in [0, 1] (the scale is
            applied per chunk, so uint8 images never exist as one big float array).
        T: frames per sample.
        size: side of the emulated sensor.
        image_size: side the images are resized to before moving them.
        threshold, refractory_us, noise_rate_hz, eps: emulator settings
            (see :func:`~hq_ptq.data.emulator.video_to_events`).
        steps_per_saccade: video frames per saccade.
        seed: noise seed.
        max_count: counts are clipped to this value to fit uint8.

    Returns:
        uint8 ``(N, T, 2, size, size)`` event counts.
    """
    travel = size - image_size - 2  # one pixel of margin on each side
    if travel < 1:
        raise ValueError(
            f"image_size={image_size} leaves no room to move on a {size}x{size} sensor; "
            f"use image_size <= size - 3"
        )
    if steps_per_saccade < 1:
        raise ValueError(f"steps_per_saccade={steps_per_saccade} must be >= 1")
    if T < 1:
        raise ValueError(f"T={T} must be >= 1")
    path = saccade_path(steps_per_saccade, float(travel))
    t_us = np.arange(len(path), dtype=np.float64) * (SACCADE_US / steps_per_saccade)
    out = np.empty((len(images), T, 2, size, size), dtype=np.uint8)
    start = time.perf_counter()
    for c, lo in enumerate(range(0, len(images), CHUNK)):
        chunk = resize_images(images[lo:lo + CHUNK].astype(np.float32) * np.float32(scale),
                              image_size)
        video = render_saccades(chunk, size, path)
        counts = _videos_to_count_frames(
            video, t_us, T, threshold=threshold, refractory_us=refractory_us,
            noise_rate_hz=noise_rate_hz, eps=eps, rng=np.random.default_rng([seed, c]),
        )
        out[lo:lo + len(chunk)] = np.minimum(counts, max_count)
    logger.info("converted %d images in %.1f s", len(images), time.perf_counter() - start)
    return out


# ----------------------------------------------------------------------------- dataset helpers


def saccade_dataset_info(name: str, classes: tuple[str, ...], description: str) -> DatasetInfo:
    """Registry facts of a saccade dataset with the builders' defaults (T=8 on a 32x32 sensor)."""
    return DatasetInfo(name=name, num_classes=len(classes), sensor_size=(32, 32),
                       frame_size=(32, 32), default_T=8, classes=classes, description=description)


def saccade_options(T: int, size: int, image_size: int, threshold: float,
                    steps_per_saccade: int, refractory_us: float, noise_rate_hz: float,
                    eps: float, emulator_seed: int) -> dict[str, Any]:
    """The builders' conversion options, normalised, as :func:`images_to_saccade_frames` takes them.

    The dict is also (part of) the cache key, so its keys and value types must stay as they are.
    """
    return dict(T=int(T), size=int(size), image_size=int(image_size),
                threshold=float(threshold), steps_per_saccade=int(steps_per_saccade),
                refractory_us=float(refractory_us), noise_rate_hz=float(noise_rate_hz),
                eps=float(eps), seed=int(emulator_seed))


def cached_saccade_frames(
    kind: str,
    key: dict[str, Any],
    load_images: Callable[[], tuple[np.ndarray, np.ndarray]],
    options: dict[str, Any],
    *,
    scale: float = 1.0,
    cache: bool = True,
) -> dict[str, np.ndarray]:
    """``{"frames", "labels"}`` of converted images, from the disk cache when it has them.

    Args:
        kind: cache file prefix (the dataset name).
        key: every option the arrays depend on (see :func:`~hq_ptq.data.registry.cached_arrays`).
        load_images: returns ``(images (N, h, w), labels (N,))``; called only on a cache miss.
        options: conversion options from :func:`saccade_options`.
        scale: multiplies the images into [0, 1] (see :func:`images_to_saccade_frames`).
        cache: False converts every time.
    """

    def build() -> dict[str, np.ndarray]:
        images, labels = load_images()
        return {"frames": images_to_saccade_frames(images, scale=scale, **options),
                "labels": labels}

    return cached_arrays(kind, key, build, enabled=cache)
