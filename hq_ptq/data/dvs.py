"""Real DVS recordings read through tonic: ``dvs-gesture``, ``cifar10-dvs``, ``n-caltech101``.

tonic is an optional extra (``pip install 'hq-ptq[dvs]'``) and is imported lazily. Files are read
from the user's ``data_dir`` in tonic's on-disk layout; nothing is downloaded unless
``download=True``. tonic's own existence check wants the archive file *and* the full file count,
so it is replaced by a check for the extracted files, and its download is blocked by default.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hq_ptq.data.emulator import EVENT_DTYPE, events_to_frames
from hq_ptq.data.registry import (
    DatasetInfo,
    EventFrames,
    cached_arrays,
    register_dataset,
)

logger = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'hq-ptq[dvs]'"


@dataclass(frozen=True, slots=True)
class _Spec:
    name: str
    tonic_class: str
    ext: str
    expected_files: int  # what tonic counts as a complete copy (train split for DVSGesture)
    sensor_size: tuple[int, int]  # (H, W)
    layout: str  # where the files go, relative to data_dir; {folder} is the split folder
    classes: tuple[str, ...] = ()  # empty: the sorted class folder names (N-Caltech101)


GESTURE_CLASSES = ("hand clapping", "right hand wave", "left hand wave", "right arm cw",
                   "right arm ccw", "left arm cw", "left arm ccw", "arm roll", "air drums",
                   "air guitar", "other gestures")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")

_GESTURE = _Spec(
    "dvs-gesture", "DVSGesture", ".npy", 100, (128, 128),
    "DVSGesture/{folder}/userNN_<lighting>/<label>.npy (extract ibmGestureTrain.tar.gz and "
    "ibmGestureTest.tar.gz into DVSGesture/)",
    GESTURE_CLASSES,
)
_CIFAR = _Spec(
    "cifar10-dvs", "CIFAR10DVS", ".aedat4", 1000, (128, 128),
    "CIFAR10DVS/<class>/*.aedat4 for the classes airplane, automobile, bird, cat, deer, dog, "
    "frog, horse, ship, truck (extract CIFAR10DVS.zip and its per-class zips into CIFAR10DVS/)",
    CIFAR10_CLASSES,
)
# N-Caltech101 recordings have no fixed size; tonic shifts x, y to start at 0 and they fit
# 240 x 180 (the ATIS crop used by spikingjelly's NCaltech101).
_CALTECH = _Spec(
    "n-caltech101", "NCALTECH101", ".bin", 8709, (180, 240),
    "NCALTECH101/Caltech101/<class>/*.bin (extract N-Caltech101-archive.zip and the "
    "Caltech101.zip inside it into NCALTECH101/)",
)


def _require_tonic() -> Any:
    try:
        import tonic
    except ImportError as exc:  # optional extra
        raise ImportError(
            f"the DVS datasets need the optional package tonic; install it with {_INSTALL_HINT}"
        ) from exc
    return tonic


def _resolve_root(spec: _Spec, data_dir: str | Path | None) -> Path:
    if data_dir is None:
        raise ValueError(
            f"dataset {spec.name!r} needs data_dir=<folder that contains {spec.tonic_class}/> "
            f"(a recipe: --set data.data_dir=DIR); expected layout: "
            f"<data_dir>/{spec.layout.format(folder='...')}"
        )
    root = Path(data_dir).expanduser().resolve()
    # Accept the dataset folder itself as well as its parent (tonic's save_to).
    if root.name == spec.tonic_class and not (root / spec.tonic_class).exists():
        root = root.parent
    return root


def _missing_error(spec: _Spec, root: Path, folder: str = "") -> FileNotFoundError:
    where = root / spec.tonic_class / folder if folder else root / spec.tonic_class
    layout = spec.layout.format(folder=folder or "...")
    return FileNotFoundError(
        f"no {spec.ext} files for {spec.name!r} under {where}; put them at "
        f"{root}/{layout}, or pass download=True to let tonic fetch them (nothing is "
        f"downloaded otherwise)"
    )


def _count_files(path: Path, ext: str, stop: int | None = None) -> int:
    n = 0
    for _ in path.glob(f"**/*{ext}"):
        n += 1
        if stop is not None and n >= stop:
            break
    return n


def _local_tonic_class(base: type, spec: _Spec, allow_download: bool) -> type:
    """Subclass of a tonic dataset that checks for extracted files and blocks downloads.

    The subclass keeps the base's name because tonic uses ``type(self).__name__`` as the folder.
    """

    def _check_exists(self: Any) -> bool:
        return _count_files(Path(self.location_on_system, self.folder_name), spec.ext, 1) > 0

    def download(self: Any) -> None:
        root = Path(self.location_on_system).parent
        if not allow_download:
            raise _missing_error(spec, root, self.folder_name)
        logger.warning("downloading %s into %s (download=True)", spec.name, root)
        base.download(self)
        inner = getattr(self, "data_filename", None)
        if isinstance(inner, str) and Path(self.location_on_system, inner).exists():
            # tonic leaves N-Caltech101's inner archive packed; unpack it once.
            from tonic.download_utils import extract_archive

            extract_archive(str(Path(self.location_on_system, inner)))

    return type(base.__name__, (base,), {"_check_exists": _check_exists, "download": download})


def _open_tonic(spec: _Spec, root: Path, *, train: bool | None, download: bool) -> Any:
    folder = "" if train is None else ("ibmGestureTrain" if train else "ibmGestureTest")
    location = root / spec.tonic_class / folder
    if not download and _count_files(location, spec.ext, 1) == 0:
        raise _missing_error(spec, root, folder)
    tonic = _require_tonic()
    cls = _local_tonic_class(getattr(tonic.datasets, spec.tonic_class), spec, download)
    ds = cls(str(root)) if train is None else cls(str(root), train=train)
    if len(ds) == 0:
        raise _missing_error(spec, root, folder)
    if train is not False and len(ds) < spec.expected_files:
        logger.warning("%s: only %d %s files under %s (a full copy has %d or more)",
                       spec.name, len(ds), spec.ext, location, spec.expected_files)
    return ds


def per_class_front_split(labels: np.ndarray, train_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Front ``ceil(ratio * n_c)`` samples of each class to train, the rest to test.

    This is spikingjelly's ``split_to_train_test_set(random_split=False)``, used by the
    Spikformer code for CIFAR10-DVS and N-Caltech101. Indices keep the input order.
    """
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio={train_ratio} must be strictly between 0 and 1")
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        pos = math.ceil(len(idx) * train_ratio)
        train.append(idx[:pos])
        test.append(idx[pos:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def events_to_sized_frames(
    events: np.ndarray, sensor_size: tuple[int, int], T: int, size: int | None
) -> np.ndarray:
    """Equal-count frames ``(T, 2, size, size)`` (or the sensor size) from raw events.

    Events outside the sensor are dropped; downsampling maps coordinates ``x -> x * size // W``
    and sums the counts, so the total is preserved.
    """
    h, w = sensor_size
    x = events["x"].astype(np.int64)
    y = events["y"].astype(np.int64)
    inside = (x >= 0) & (y >= 0) & (x < w) & (y < h)
    out_h, out_w = (h, w) if size is None else (size, size)
    ev = np.empty(int(inside.sum()), dtype=EVENT_DTYPE)
    ev["x"] = x[inside] * out_w // w
    ev["y"] = y[inside] * out_h // h
    ev["t"] = events["t"][inside].astype(np.int64)
    ev["p"] = events["p"][inside].astype(np.int64) > 0
    return events_to_frames(ev, (out_h, out_w), T, mode="count")


class TonicFrames(Dataset):
    """Frames converted on access from a tonic dataset.

    Args:
        source: a tonic dataset whose items are ``(events, target)``.
        indices: which source items belong to this split.
        labels: the integer label of each selected item.
        sensor_size: ``(H, W)`` of the recordings.
        T: frames per sample.
        size: output side (``None`` keeps the sensor size).
        classes: class names, index = label.
    """

    def __init__(self, source: Any, indices: np.ndarray, labels: np.ndarray,
                 sensor_size: tuple[int, int], T: int, size: int | None,
                 classes: tuple[str, ...]):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.sensor_size = sensor_size
        self.T = T
        self.size = size
        self.classes = classes

    @property
    def targets(self) -> list[int]:
        """Labels as a list (torchvision / tonic convention)."""
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def frames_numpy(self, index: int) -> np.ndarray:
        """float32 ``(T, 2, H, W)`` event counts of item ``index``."""
        events, _ = self.source[int(self.indices[index])]
        return events_to_sized_frames(events, self.sensor_size, self.T, self.size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.frames_numpy(index)), int(self.labels[index])


def _tonic_split(spec: _Spec, src: Any, root: Path, split: str, order: np.ndarray,
                 labels: np.ndarray, classes: tuple[str, ...], *, T: int, size: int | None,
                 cache: bool) -> Dataset:
    """The split as :class:`TonicFrames` over items ``order`` of ``src`` (the builders' shared tail).

    With ``cache`` the whole split is converted once and kept in the disk cache (uint16 counts).
    """
    ds = TonicFrames(src, order, labels, spec.sensor_size, _check_T(T), _check_size(size), classes)
    if not cache:
        return ds
    key = dict(dataset=spec.name, split=split, source=str(root), n=len(ds), T=ds.T,
               size=ds.size, files=[str(p) for p in np.asarray(ds.source.data)[ds.indices]])

    def build() -> dict[str, np.ndarray]:
        logger.info("converting %d %s %s samples", len(ds), spec.name, split)
        frames = np.stack([np.minimum(ds.frames_numpy(i), 65535).astype(np.uint16)
                           for i in range(len(ds))])
        return {"frames": frames, "labels": ds.labels}

    arrays = cached_arrays(spec.name, key, build)
    return EventFrames(arrays["frames"], arrays["labels"], classes=ds.classes)


def _check_T(T: int) -> int:
    if int(T) < 1:
        raise ValueError(f"T={T} must be >= 1 (frames per sample, e.g. 16)")
    return int(T)


def _check_size(size: int | None) -> int | None:
    if size is not None and int(size) < 1:
        raise ValueError(f"size={size} must be a positive frame side (e.g. 128 or 64) or None")
    return None if size is None else int(size)


def _sorted_source(ds: Any, label_of: Callable[[Any], int]) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``ds`` ordered by (label, file path), and their integer labels.

    tonic lists files in ``os.walk`` order, which differs between file systems; sorting by path
    (like torchvision's DatasetFolder) makes the per-class front split reproducible.
    """
    labels = np.array([label_of(t) for t in ds.targets], dtype=np.int64)
    paths = [str(p) for p in ds.data]
    order = sorted(range(len(paths)), key=lambda i: (labels[i], paths[i]))
    order_arr = np.array(order, dtype=np.int64)
    return order_arr, labels[order_arr]


@register_dataset(
    "dvs-gesture",
    info=DatasetInfo(
        name="dvs-gesture", num_classes=11, sensor_size=(128, 128), frame_size=(128, 128),
        default_T=16, classes=GESTURE_CLASSES,
        description="IBM DVS128 Gesture via tonic (official user split; needs data_dir)",
    ),
)
def build_dvs_gesture(
    split: str,
    *,
    data_dir: str | Path | None = None,
    T: int = 16,
    size: int | None = 128,
    download: bool = False,
    cache: bool = False,
) -> Dataset:
    """DVS128 Gesture: 11 classes, official train (users 1-23) / test (24-29) split.

    Args:
        split: ``"train"`` or ``"test"``.
        data_dir: folder containing ``DVSGesture/ibmGestureTrain`` and ``.../ibmGestureTest``.
        T: equal-event-count frames per sample.
        size: output side (events are binned onto a ``size x size`` grid); None = 128.
        download: let tonic download the archives when the files are missing.
        cache: convert the split once and keep it in ``cache_dir()`` (fast epochs, uses RAM).

    Returns:
        A dataset of ``(FloatTensor [T, 2, size, size], label)``.

    Raises:
        FileNotFoundError: when the files are missing (and ``download`` is False).
        ImportError: when tonic is not installed.
    """
    root = _resolve_root(_GESTURE, data_dir)
    src = _open_tonic(_GESTURE, root, train=split == "train", download=download)
    order, labels = _sorted_source(src, int)
    if labels.min() < 0 or labels.max() >= len(GESTURE_CLASSES):
        raise ValueError(f"DVSGesture labels must be 0..10, found {labels.min()}..{labels.max()} "
                         f"under {root}; file names must be <label>.npy")
    return _tonic_split(_GESTURE, src, root, split, order, labels, GESTURE_CLASSES, T=T,
                        size=size, cache=cache)


def _class_folder_names(src: Any, root: Path) -> tuple[str, ...]:
    """N-Caltech101's classes: tonic's targets there are the class folder names, sorted here."""
    classes = tuple(sorted(set(src.targets)))
    if len(classes) != 101:
        logger.warning("n-caltech101: found %d class folders under %s, the full set has 101",
                       len(classes), root)
    return classes


def build_front_split_dataset(
    spec: _Spec,
    split: str,
    *,
    data_dir: str | Path | None = None,
    T: int = 16,
    size: int | None = 128,
    train_ratio: float = 0.9,
    download: bool = False,
    cache: bool = False,
) -> Dataset:
    """CIFAR10-DVS or N-Caltech101: the first 90% of each class (sorted by file name) train.

    Registered once per dataset with ``spec`` bound (``functools.partial``), so both share this
    signature and body.

    Args:
        spec: which dataset (``_CIFAR`` or ``_CALTECH``).
        split: ``"train"`` or ``"test"``.
        data_dir: folder containing ``CIFAR10DVS/<class>/*.aedat4`` or
            ``NCALTECH101/Caltech101/<class>/*.bin``.
        T: equal-event-count frames per sample.
        size: output side; None keeps the sensor size (128x128 for CIFAR10-DVS; N-Caltech101's
            180x240 sensor is squeezed to ``size x size`` otherwise).
        train_ratio: fraction of each class used for training (front of the class).
        download: let tonic download the archive when the files are missing.
        cache: convert the split once and keep it in ``cache_dir()``.

    Returns:
        A dataset of ``(FloatTensor [T, 2, H, W], label)``.

    Raises:
        FileNotFoundError: when the files are missing (and ``download`` is False).
        ImportError: when tonic (or, for CIFAR10-DVS, the ``aedat`` reader) is not installed.
    """
    root = _resolve_root(spec, data_dir)
    src = _open_tonic(spec, root, train=None, download=download)
    if spec.ext == ".aedat4" and importlib.util.find_spec("aedat") is None:
        raise ImportError("reading CIFAR10-DVS .aedat4 files needs the 'aedat' package, which "
                          "tonic does not install; run pip install aedat")
    if spec.classes:
        classes, label_of = spec.classes, int
    else:
        classes = _class_folder_names(src, root)
        label_of = {c: i for i, c in enumerate(classes)}.__getitem__
    order, labels = _sorted_source(src, label_of)
    train_idx, test_idx = per_class_front_split(labels, train_ratio)
    pick = train_idx if split == "train" else test_idx
    return _tonic_split(spec, src, root, split, order[pick], labels[pick], classes, T=T,
                        size=size, cache=cache)


build_cifar10_dvs = register_dataset(
    "cifar10-dvs",
    info=DatasetInfo(
        name="cifar10-dvs", num_classes=10, sensor_size=(128, 128), frame_size=(128, 128),
        default_T=16, classes=CIFAR10_CLASSES,
        description="CIFAR10-DVS via tonic (90/10 per-class front split; needs data_dir, aedat)",
    ),
)(functools.partial(build_front_split_dataset, _CIFAR))

build_n_caltech101 = register_dataset(
    "n-caltech101",
    info=DatasetInfo(
        name="n-caltech101", num_classes=101, sensor_size=(180, 240), frame_size=(128, 128),
        default_T=16,
        description="N-Caltech101 via tonic (90/10 per-class front split; needs data_dir)",
    ),
)(functools.partial(build_front_split_dataset, _CALTECH))
