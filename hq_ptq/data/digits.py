"""``digits``: scikit-learn's 8x8 digits turned into DVS recordings (no download needed).

The conversion (upscale, three saccades, DVS emulator) lives in :mod:`hq_ptq.data.saccades`
and is shared with ``fashion``; this module supplies the images and the fixed split.
"""

from __future__ import annotations

import numpy as np

from hq_ptq.data.registry import EventFrames, register_dataset, split_subset
from hq_ptq.data.saccades import (  # noqa: F401  (re-exported: they were defined here before)
    CHUNK,
    SACCADE_US,
    cached_saccade_frames,
    images_to_saccade_frames,
    render_saccades,
    resize_images,
    saccade_dataset_info,
    saccade_options,
    saccade_path,
)

DIGITS_TEST_SIZE = 360
_SPLIT_SEED = 0  # fixed: the split must never follow a user seed
_CLASSES = tuple(str(i) for i in range(10))


def digits_split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split of the 1797 digits: ``(train_idx, test_idx)``, 360 test samples."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=DIGITS_TEST_SIZE, stratify=labels,
                                   random_state=_SPLIT_SEED)
    return np.sort(train), np.sort(test)


def _load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as float32 intensities in [0, 1] and their int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@register_dataset(
    "digits",
    info=saccade_dataset_info(
        "digits", _CLASSES,
        "sklearn 8x8 digits moved along 3 saccades through a DVS emulator (built in)",
    ),
)
def build_digits(
    split: str,
    *,
    T: int = 8,
    size: int = 32,
    image_size: int = 24,
    threshold: float = 0.2,
    steps_per_saccade: int = 10,
    refractory_us: float = 0.0,
    noise_rate_hz: float = 0.0,
    eps: float = 0.1,
    emulator_seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
    val_subset: int | None = None,
    cache: bool = True,
) -> EventFrames:
    """The ``digits`` dataset (1437 train / 360 test, stratified, fixed split).

    Args:
        split: ``"train"``, ``"val"`` (needs ``val_subset``) or ``"test"``.
        T: frames per sample (equal-event-count slices).
        size: sensor side; frames are ``size x size``.
        image_size: the 8x8 digits are upscaled to this side (cubic) before moving.
        threshold: emulator contrast threshold (log units).
        steps_per_saccade: video frames per saccade (3 saccades, 100 ms each).
        refractory_us: emulator refractory period.
        noise_rate_hz: emulator background events per pixel per second.
        eps: emulator log offset.
        emulator_seed: seed of the emulator noise (the split does not depend on it).
        train_subset: use a fixed class-stratified subset of this many training samples (quick runs).
        test_subset: same for the test split.
        val_subset: hold out a fixed class-stratified subset of this many training samples as the
            ``val`` split (then never in ``train``; see :func:`~hq_ptq.data.registry.split_subset`).
        cache: keep the converted array in ``cache_dir()`` (keyed by all options above).

    Returns:
        An :class:`EventFrames` dataset of ``(FloatTensor [T, 2, size, size], label)``.
    """
    options = saccade_options(T, size, image_size, threshold, steps_per_saccade, refractory_us,
                              noise_rate_hz, eps, emulator_seed)
    # All 1797 digits are converted and cached once; the split is taken afterwards.
    arrays = cached_saccade_frames("digits", options, _load_digit_images, options, cache=cache)
    train_idx, test_idx = digits_split_indices(arrays["labels"])
    idx = test_idx if split == "test" else train_idx
    idx = idx[split_subset(arrays["labels"][idx], split, train_subset, test_subset, val_subset)]
    return EventFrames(arrays["frames"][idx], arrays["labels"][idx], classes=_CLASSES)
