"""Event data for hq_ptq: a DVS emulator, frame binning and a dataset registry.

Importing this package registers the built-in datasets: ``digits`` (embedded, no download),
``fashion`` (local Fashion-MNIST idx files) and, through the optional tonic extra,
``dvs-gesture``, ``cifar10-dvs`` and ``n-caltech101``.
"""

from __future__ import annotations

from hq_ptq.data import digits, dvs, fashion  # noqa: F401  (imported to register datasets)
from hq_ptq.data.emulator import EVENT_DTYPE, events_to_frames, video_to_events
from hq_ptq.data.registry import (
    DatasetInfo,
    EventFrames,
    cache_dir,
    collate_time_first,
    dataset_info,
    get_dataset,
    list_datasets,
    make_loaders,
    register_dataset,
)

__all__ = [
    "EVENT_DTYPE",
    "DatasetInfo",
    "EventFrames",
    "cache_dir",
    "collate_time_first",
    "dataset_info",
    "events_to_frames",
    "get_dataset",
    "list_datasets",
    "make_loaders",
    "register_dataset",
    "video_to_events",
]
