"""Dataset registry, the frame dataset type, loaders and the on-disk cache.

Every dataset is a builder ``builder(split, **options) -> torch Dataset`` registered under a name
with :func:`register_dataset`; items are ``(frames FloatTensor [T, 2, H, W], label int)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hq_ptq.files import atomic_write

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

#: Bump when the layout or the maths of a cached array changes, so old files are not reused.
CACHE_VERSION = 1


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    """Static facts about a registered dataset (with its default options).

    Attributes:
        name: registry name.
        num_classes: number of labels; labels are ``0 .. num_classes - 1``.
        sensor_size: ``(H, W)`` of the (real or emulated) event sensor.
        frame_size: ``(H, W)`` of the frames returned with the default options.
        default_T: number of time steps ``T`` returned by default.
        classes: class names, index = label.
        description: one line for listings.
    """

    name: str
    num_classes: int
    sensor_size: tuple[int, int]
    frame_size: tuple[int, int]
    default_T: int
    classes: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True, slots=True)
class _Entry:
    builder: Callable[..., Dataset]
    info: DatasetInfo
    options: tuple[str, ...]


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(
    name: str, *, info: DatasetInfo | None = None
) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Register ``builder(split, **options) -> Dataset`` under ``name``.

    Args:
        name: registry name (lower case, e.g. ``"digits"``).
        info: static facts; if omitted the builder must carry an ``info`` attribute.

    Returns:
        A decorator that registers the builder and returns it unchanged.

    Raises:
        ValueError: if the name is taken or no :class:`DatasetInfo` is available.

    Example:
        >>> @register_dataset("toy", info=DatasetInfo("toy", 2, (4, 4), (4, 4), 3))  # doctest: +SKIP
        ... def build_toy(split: str, *, T: int = 3) -> Dataset: ...
    """

    def deco(builder: Callable[..., Dataset]) -> Callable[..., Dataset]:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} is already registered; pick another name")
        meta = info if info is not None else getattr(builder, "info", None)
        if not isinstance(meta, DatasetInfo):
            raise ValueError(f"register_dataset({name!r}) needs info=DatasetInfo(...)")
        params = inspect.signature(builder).parameters
        options = tuple(p.name for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY)
        _REGISTRY[name] = _Entry(builder, meta, options)
        return builder

    return deco


def list_datasets() -> list[str]:
    """Names of all registered datasets, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        known = list_datasets()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(known)}.{hint}")
    return _REGISTRY[name]


def dataset_info(name: str, **options: Any) -> DatasetInfo:
    """Static facts about dataset ``name``.

    Args:
        name: registry name.
        **options: ``T`` and ``size`` (frame side) override the defaults in the answer, so a
            model can be sized for ``get_dataset(name, split, T=..., size=...)``.

    Returns:
        The :class:`DatasetInfo`.

    Raises:
        ValueError: on an unknown name or option.
    """
    entry = _entry(name)
    _check_options(name, entry, options)
    info = entry.info
    if options.get("T") is not None:
        info = dataclasses.replace(info, default_T=int(options["T"]))
    if options.get("size") is not None:
        info = dataclasses.replace(info, frame_size=(int(options["size"]), int(options["size"])))
    return info


def _check_options(name: str, entry: _Entry, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        raise ValueError(
            f"dataset {name!r} has no option(s) {unknown}; its options are: "
            f"{', '.join(entry.options) or '(none)'}"
        )


def get_dataset(name: str, split: str, **options: Any) -> Dataset:
    """Build a split of a registered dataset.

    Args:
        name: registry name (see :func:`list_datasets`).
        split: ``"train"``, ``"val"`` (training samples held out, for datasets with a ``val_subset``
            option) or ``"test"``.
        **options: dataset options (see each builder), e.g. ``T=8``.

    Returns:
        A torch ``Dataset`` whose items are ``(frames FloatTensor [T, 2, H, W], label int)``.

    Raises:
        ValueError: on an unknown name, split or option.

    Example:
        >>> ds = get_dataset("digits", "test", T=8)   # doctest: +SKIP
        >>> frames, label = ds[0]
    """
    entry = _entry(name)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; use one of {SPLITS}")
    _check_options(name, entry, options)
    if split == "val" and "val_subset" not in entry.options:
        raise ValueError(f"dataset {name!r} has no validation split; hold out training samples yourself")
    return entry.builder(split, **options)


class EventFrames(Dataset):
    """In-memory frame dataset: compact integer counts, converted to float32 on access.

    Args:
        frames: ``(N, T, 2, H, W)`` integer event counts (uint8 or uint16).
        labels: ``(N,)`` integer labels.
        classes: class names, index = label.
    """

    def __init__(self, frames: np.ndarray, labels: np.ndarray, classes: Sequence[str] = ()):
        if frames.ndim != 5 or frames.shape[2] != 2:
            raise ValueError(f"frames has shape {frames.shape}; expected (N, T, 2, H, W)")
        if len(frames) != len(labels):
            raise ValueError(f"{len(frames)} frame stacks but {len(labels)} labels")
        self.frames = frames
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = tuple(classes)

    @property
    def targets(self) -> list[int]:
        """Labels as a list (torchvision / tonic convention)."""
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.frames[index].astype(np.float32)), int(self.labels[index])


def collate_time_first(
    batch: Sequence[tuple[torch.Tensor, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(frames [T, 2, H, W], label)`` items into ``([T, B, 2, H, W] float32, [B] int64)``.

    The models in this project consume time-first input, so the batch axis is moved to dim 1.
    """
    frames = torch.stack([f for f, _ in batch]).to(torch.float32)
    labels = torch.as_tensor([int(y) for _, y in batch], dtype=torch.int64)
    return frames.transpose(0, 1).contiguous(), labels


def make_loaders(
    name: str,
    *,
    batch_size: int,
    seed: int = 0,
    test_batch_size: int | None = None,
    drop_last: bool = False,
    **options: Any,
) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders of a registered dataset, time-first.

    Args:
        name: registry name.
        batch_size: training batch size.
        seed: seeds the training shuffle only (never the data or the split).
        test_batch_size: defaults to ``batch_size``.
        drop_last: drop the last incomplete training batch.
        **options: dataset options passed to :func:`get_dataset`.

    Returns:
        ``(train_loader, test_loader)``; batches are ``([T, B, 2, H, W] float32, [B] int64)``.
        The test loader is not shuffled.

    Raises:
        ValueError: on a bad batch size or an unknown dataset/option.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    test_bs = batch_size if test_batch_size is None else int(test_batch_size)
    if test_bs < 1:
        raise ValueError(f"test_batch_size={test_bs} must be >= 1")
    train = get_dataset(name, "train", **options)
    test = get_dataset(name, "test", **options)
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    train_loader = DataLoader(
        train,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        num_workers=0,
        collate_fn=collate_time_first,
        drop_last=drop_last,
    )
    test_loader = DataLoader(
        test,
        batch_size=test_bs,
        shuffle=False,
        num_workers=0,
        collate_fn=collate_time_first,
    )
    return train_loader, test_loader


# ----------------------------------------------------------------------------- disk cache


def cache_dir() -> Path:
    """Cache folder: ``$HQ_PTQ_CACHE`` if set, else ``~/.cache/hq_ptq`` (not created here)."""
    env = os.environ.get("HQ_PTQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hq_ptq"


def cache_key(kind: str, options: dict[str, Any]) -> str:
    """Stable hash of every option that changes the cached array."""
    blob = json.dumps({"kind": kind, "version": CACHE_VERSION, **options}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_arrays(
    kind: str,
    options: dict[str, Any],
    build: Callable[[], dict[str, np.ndarray]],
    *,
    enabled: bool = True,
) -> dict[str, np.ndarray]:
    """Load arrays from the cache or build and store them.

    The file is ``cache_dir()/<kind>-<hash of options>.npz``; it is written to a temporary file
    in the same folder and moved into place with ``os.replace``, so a crash or a concurrent
    writer never leaves a half-written file under the final name.

    Args:
        kind: file-name prefix (e.g. ``"digits"``).
        options: every option the arrays depend on (JSON-serialisable).
        build: makes the arrays when they are not cached.
        enabled: False skips the cache entirely.

    Returns:
        The arrays by name.
    """
    if not enabled:
        return build()
    path = cache_dir() / f"{kind}-{cache_key(kind, options)}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k != "_options"}
            logger.info("loaded %s from cache %s", kind, path)
            return arrays
        except (OSError, ValueError, EOFError) as exc:  # a damaged file is rebuilt, not fatal
            logger.warning("cache file %s is unreadable (%s); rebuilding it", path, exc)
    arrays = build()
    options_json = np.array(json.dumps(options, sort_keys=True, default=str))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: given a name, numpy would append ".npz" to it
            np.savez_compressed(f, _options=options_json, **arrays)

    atomic_write(path, write)
    logger.info("wrote %s cache %s", kind, path)
    return arrays


_SUBSET_SEED = 0  # fixed: a subset must not follow the user seed


def subset_indices(labels: np.ndarray, n: int | None) -> np.ndarray:
    """A fixed, class-stratified subset of ``n`` indices (all of them when ``n`` is None)."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    if n < len(np.unique(labels)):
        raise ValueError(f"subset of {n} is smaller than the number of classes; use >= 10")
    from sklearn.model_selection import train_test_split

    idx, _ = train_test_split(
        np.arange(len(labels)), train_size=int(n), stratify=labels, random_state=_SUBSET_SEED
    )
    return np.sort(idx)


def split_subset(
    labels: np.ndarray,
    split: str,
    train_subset: int | None,
    test_subset: int | None,
    val_subset: int | None = None,
) -> np.ndarray:
    """Indices into ``labels`` (the training pool for ``train``/``val``, the test set for ``test``) of
    ``split`` with the sizes the builder options ask for.

    ``val`` is a fixed class-stratified subset of ``val_subset`` training samples that the ``train`` split
    never contains, for choosing settings without touching the test set: it is drawn from the samples
    ``train_subset`` leaves out, or, without ``train_subset``, it is removed from ``train``.
    """
    if split == "test":
        return subset_indices(labels, None if test_subset is None else int(test_subset))
    train = subset_indices(labels, None if train_subset is None else int(train_subset))
    if val_subset is None:
        if split == "val":
            raise ValueError("split 'val' needs val_subset=N, the number of training samples to hold out")
        return train
    pool = np.setdiff1d(np.arange(len(labels)), train) if train_subset is not None else train
    if not len(np.unique(labels)) <= int(val_subset) < len(pool):
        raise ValueError(
            f"val_subset={val_subset} must be at least the number of classes and less than the "
            f"{len(pool)} training samples it is drawn from"
        )
    val = pool[subset_indices(labels[pool], int(val_subset))]
    if split == "val":
        return val
    return train if train_subset is not None else np.setdiff1d(train, val)
