"""``fashion``: Fashion-MNIST turned into saccade DVS recordings, like ``digits``.

Reads the four standard idx ``.gz`` files from a local folder (by default the Debian package
``dataset-fashion-mnist``); nothing is downloaded.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np

from hq_ptq.data.registry import EventFrames, register_dataset, split_subset
from hq_ptq.data.saccades import cached_saccade_frames, saccade_dataset_info, saccade_options

logger = logging.getLogger(__name__)

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")


def _find(data_dir: Path, name: str) -> Path | None:
    for candidate in (data_dir / name, data_dir / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path} is not an idx file of the expected kind (magic {found}, "
                         f"expected {magic}); re-install the Fashion-MNIST files")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {data.size} values, its header says {shape}; "
                         f"the file is truncated, re-install it")
    return data.reshape(shape)


def read_fashion_mnist(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one split of Fashion-MNIST.

    Args:
        data_dir: folder with the idx files (``.gz`` or uncompressed).
        split: ``"train"`` (60000) or ``"test"`` (10000).

    Returns:
        ``(images uint8 (N, 28, 28), labels int64 (N,))``.

    Raises:
        FileNotFoundError: naming the folder, the missing files and how to get them.
    """
    data_dir = Path(data_dir).expanduser()
    image_name, label_name = FILES[split]
    paths = {name: _find(data_dir, name) for name in (image_name, label_name)}
    missing = [name for name, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST file(s) {', '.join(missing)} not found in {data_dir}; install the "
            f"Debian package (apt-get install dataset-fashion-mnist, it puts them in "
            f"{DEFAULT_DIR}) or copy the four idx .gz files to a folder and pass it with "
            f"data_dir=... (a recipe: --set data.data_dir=DIR)"
        )
    images = _read_idx(paths[image_name], 0x0803)  # type: ignore[arg-type]
    labels = _read_idx(paths[label_name], 0x0801)  # type: ignore[arg-type]
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels in {data_dir}")
    return images, labels.astype(np.int64)


@register_dataset(
    "fashion",
    info=saccade_dataset_info(
        "fashion", CLASSES,
        "Fashion-MNIST moved along 3 saccades through a DVS emulator (local idx files)",
    ),
)
def build_fashion(
    split: str,
    *,
    data_dir: str | Path = DEFAULT_DIR,
    train_subset: int | None = None,
    test_subset: int | None = None,
    val_subset: int | None = None,
    T: int = 8,
    size: int = 32,
    image_size: int = 24,
    threshold: float = 0.2,
    steps_per_saccade: int = 10,
    refractory_us: float = 0.0,
    noise_rate_hz: float = 0.0,
    eps: float = 0.1,
    emulator_seed: int = 0,
    cache: bool = True,
) -> EventFrames:
    """The ``fashion`` dataset (official 60000/10000 split, optionally a fixed subset).

    Args:
        split: ``"train"``, ``"val"`` (needs ``val_subset``) or ``"test"``.
        data_dir: folder with the four idx ``.gz`` files.
        train_subset: use a fixed class-stratified subset of this many training images.
        test_subset: same for the test split.
        val_subset: hold out a fixed class-stratified subset of this many training images as the
            ``val`` split, drawn from the images ``train_subset`` leaves out (or removed from ``train``
            without it; see :func:`~hq_ptq.data.registry.split_subset`).
        T, size, image_size, threshold, steps_per_saccade, refractory_us, noise_rate_hz, eps,
            emulator_seed: as for ``digits`` (images are resized 28 -> ``image_size``).
        cache: keep the converted split in ``cache_dir()`` (keyed by all options).

    Returns:
        An :class:`EventFrames` dataset of ``(FloatTensor [T, 2, size, size], label)``.

    Raises:
        FileNotFoundError: when the idx files are not in ``data_dir``.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    images, labels = read_fashion_mnist(data_dir, "test" if split == "test" else "train")
    idx = split_subset(labels, split, train_subset, test_subset, val_subset)
    options = saccade_options(T, size, image_size, threshold, steps_per_saccade, refractory_us,
                              noise_rate_hz, eps, emulator_seed)
    # Only the chosen subset of this split is converted, so the cache key names all three.
    key = dict(options, split=split, n=len(idx), source=str(data_dir))
    if val_subset is not None:  # the same count can be a different set of images once some are held out
        key["val_subset"] = int(val_subset)

    def load_subset() -> tuple[np.ndarray, np.ndarray]:
        logger.info("converting %d Fashion-MNIST %s images to events", len(idx), split)
        return images[idx], labels[idx]

    arrays = cached_saccade_frames("fashion", key, load_subset, options, scale=1.0 / 255.0,
                                   cache=cache)
    return EventFrames(arrays["frames"], arrays["labels"], classes=CLASSES)
