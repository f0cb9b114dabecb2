"""Tests of hq_ptq.data: the DVS emulator, frame binning, the registry and the datasets."""

from __future__ import annotations

import gzip
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hq_ptq.data import (
    EVENT_DTYPE,
    cache_dir,
    collate_time_first,
    dataset_info,
    events_to_frames,
    get_dataset,
    list_datasets,
    make_loaders,
    video_to_events,
)
from hq_ptq.data.emulator import _videos_to_count_frames

# Small generation options: the same code path as the defaults, a fraction of the work.
SMALL = dict(T=4, size=16, image_size=10, steps_per_saccade=3)


def _ramp(start: float, end: float, steps: int = 6, shape=(3, 4), at=(1, 2)) -> np.ndarray:
    """Static grey video in which pixel ``at`` (y, x) goes linearly from start to end."""
    video = np.full((steps, *shape), 0.5)
    video[:, at[0], at[1]] = np.linspace(start, end, steps)
    return video


# ----------------------------------------------------------------------------- emulator


def test_brightening_gives_only_on_events_at_that_pixel():
    ev = video_to_events(_ramp(0.2, 0.9))
    assert ev.dtype == EVENT_DTYPE and ev.size > 0
    assert (ev["p"] == 1).all()
    assert (ev["y"] == 1).all() and (ev["x"] == 2).all()


def test_darkening_gives_only_off_events():
    ev = video_to_events(_ramp(0.9, 0.2))
    assert ev.size > 0 and (ev["p"] == 0).all()


def test_static_scene_gives_no_events():
    assert video_to_events(np.full((10, 5, 5), 0.7)).size == 0
    assert video_to_events(np.full((1, 5, 5), 0.7)).size == 0


def test_event_count_grows_with_contrast_and_follows_the_log_model():
    counts = [video_to_events(_ramp(0.2, end)).size for end in (0.3, 0.5, 0.7, 0.95)]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    # Exactly floor(log-change / threshold) crossings for a monotone ramp.
    eps, thr = 0.1, 0.2
    expected = int(np.floor(np.log((0.95 + eps) / (0.2 + eps)) / thr))
    assert counts[-1] == expected
    assert video_to_events(_ramp(0.2, 0.95), threshold=0.1).size > counts[-1]


def test_several_events_in_one_step_get_interpolated_times():
    ev = video_to_events(np.array([0.0, 1.0]).reshape(2, 1, 1), np.array([0.0, 1000.0]))
    assert ev.size > 5
    assert (ev["p"] == 1).all()
    t = ev["t"]
    assert (np.diff(t) > 0).all(), "crossings inside one step must be spread in time"
    assert t[0] > 0 and t[-1] <= 1000


def test_refractory_period_reduces_events_and_spaces_them():
    video = np.array([0.0, 1.0, 0.0, 1.0]).reshape(4, 1, 1)
    free = video_to_events(video)
    slow = video_to_events(video, refractory_us=300)
    assert 0 < slow.size < free.size
    assert (np.diff(slow["t"]) >= 299).all()


def test_events_are_sorted_and_noise_is_seeded():
    video = np.full((11, 8, 8), 0.5)
    a = video_to_events(video, noise_rate_hz=500.0, seed=1)
    b = video_to_events(video, noise_rate_hz=500.0, seed=1)
    c = video_to_events(video, noise_rate_hz=500.0, seed=2)
    expected = 500.0 * 64 * 0.01  # rate x pixels x seconds
    assert abs(a.size - expected) < 5 * np.sqrt(expected)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert (np.diff(a["t"]) >= 0).all()
    moving = video_to_events(np.random.default_rng(0).uniform(0, 1, (8, 6, 6)))
    assert (np.diff(moving["t"]) >= 0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(frames=np.zeros((4, 4))), "expected"),
        (dict(frames=-np.ones((3, 2, 2))), "non-negative"),
        (dict(frames=np.ones((3, 2, 2)), threshold=0.0), "threshold"),
        (dict(frames=np.ones((3, 2, 2)), timestamps_us=np.array([0, 2, 1])), "increasing"),
    ],
    ids=["2d", "negative", "threshold", "timestamps"],
)
def test_emulator_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        video_to_events(**kwargs)


# ----------------------------------------------------------------------------- frames


def _random_events(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ev = np.empty(n, dtype=EVENT_DTYPE)
    ev["x"] = rng.integers(0, w, n)
    ev["y"] = rng.integers(0, h, n)
    ev["t"] = np.sort(rng.integers(0, 10_000, n))
    ev["p"] = rng.integers(0, 2, n)
    return ev


@pytest.mark.parametrize("mode", ["count", "time"])
def test_events_to_frames_shape_dtype_and_conservation(mode):
    ev = _random_events(1003, 5, 7)
    frames = events_to_frames(ev, (5, 7), 4, mode=mode)
    assert frames.shape == (4, 2, 5, 7) and frames.dtype == np.float32
    assert frames.sum() == ev.size
    assert frames[:, 1].sum() == (ev["p"] == 1).sum()  # channel 1 = ON


def test_count_mode_uses_spikingjelly_equal_number_slices():
    frames = events_to_frames(_random_events(1003, 5, 7), (5, 7), 4, mode="count")
    assert frames.sum(axis=(1, 2, 3)).tolist() == [250, 250, 250, 253]


def test_time_mode_uses_equal_time_bins():
    ev = np.zeros(4, dtype=EVENT_DTYPE)
    ev["t"] = [0, 10, 20, 99]
    frames = events_to_frames(ev, (1, 1), 2, mode="time")
    assert frames.sum(axis=(1, 2, 3)).tolist() == [3, 1]


def test_events_to_frames_places_events_by_x_y_p():
    ev = np.zeros(1, dtype=EVENT_DTYPE)
    ev["x"], ev["y"], ev["p"] = 3, 1, 1
    frames = events_to_frames(ev, (2, 4), 1)
    assert frames[0, 1, 1, 3] == 1 and frames.sum() == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(n_frames=0), "n_frames"), (dict(n_frames=2, mode="bins"), "mode"),
     (dict(n_frames=2, sensor_size=(2, 2)), "do not fit")],
    ids=["zero-frames", "mode", "coords"],
)
def test_events_to_frames_rejects_bad_args(kwargs, match):
    args = dict(events=_random_events(20, 5, 7), sensor_size=(5, 7)) | kwargs
    with pytest.raises(ValueError, match=match):
        events_to_frames(**args)


@pytest.mark.parametrize("refractory_us", [0.0, 1500.0])
def test_batched_conversion_equals_per_sample_conversion(refractory_us):
    videos = np.random.default_rng(1).uniform(0, 1, (12, 5, 6, 7)).astype(np.float32)
    t = np.arange(12) * 1000.0
    batch = _videos_to_count_frames(videos, t, 4, threshold=0.2, refractory_us=refractory_us)
    for i in range(5):
        ev = video_to_events(videos[:, i], t, refractory_us=refractory_us)
        assert np.array_equal(events_to_frames(ev, (6, 7), 4), batch[i])


# ----------------------------------------------------------------------------- registry


def test_registry_lists_and_describes_datasets():
    assert {"digits", "fashion", "dvs-gesture", "cifar10-dvs", "n-caltech101"} <= set(
        list_datasets())
    info = dataset_info("digits")
    assert (info.num_classes, info.frame_size, info.default_T) == (10, (32, 32), 8)
    assert dataset_info("dvs-gesture", size=64, T=10).frame_size == (64, 64)
    assert dataset_info("dvs-gesture").num_classes == 11


def test_unknown_dataset_suggests_a_name():
    with pytest.raises(ValueError, match="Did you mean 'digits'") as err:
        get_dataset("digts", "train")
    assert "fashion" in str(err.value)


def test_unknown_option_and_split_are_rejected():
    with pytest.raises(ValueError, match="no option"):
        get_dataset("digits", "train", colour=True)
    with pytest.raises(ValueError, match="split"):
        get_dataset("digits", "valid")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HQ_PTQ_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("HQ_PTQ_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "hq_ptq"


def test_collate_time_first():
    batch = [(torch.full((3, 2, 4, 4), float(i)), i) for i in range(5)]
    x, y = collate_time_first(batch)
    assert x.shape == (3, 5, 2, 4, 4) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(x[:, 2], batch[2][0])


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """A private cache holding the default digits conversion (built once per module)."""
    path = tmp_path_factory.mktemp("hq_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HQ_PTQ_CACHE", str(path))
        train, test = get_dataset("digits", "train"), get_dataset("digits", "test")
    return path, train, test


def test_digits_default_split_shapes_and_labels(digits_cache):
    _, train, test = digits_cache
    assert (len(train), len(test)) == (1437, 360)
    frames, label = test[0]
    assert frames.shape == (8, 2, 32, 32) and frames.dtype == torch.float32
    assert isinstance(label, int)
    for ds in (train, test):
        assert ds.labels.min() == 0 and ds.labels.max() == 9
    assert np.bincount(test.labels, minlength=10).min() >= 35  # stratified
    # Every sample has events in every frame, on both polarities.
    assert (test.frames.reshape(360, 8, -1).sum(-1) > 0).all()
    assert test.frames[:, :, 0].sum() > 0 and test.frames[:, :, 1].sum() > 0


def test_digits_cache_is_reused_and_written_atomically(digits_cache, monkeypatch):
    path, _, test = digits_cache
    files = sorted(p.name for p in path.iterdir())
    assert len(files) == 1 and files[0].startswith("digits-") and files[0].endswith(".npz")
    monkeypatch.setenv("HQ_PTQ_CACHE", str(path))
    again = get_dataset("digits", "test")
    assert np.array_equal(again.frames, test.frames)
    assert np.array_equal(again.labels, test.labels)


def test_digits_is_deterministic_and_keyed_by_options(tmp_path, monkeypatch):
    monkeypatch.setenv("HQ_PTQ_CACHE", str(tmp_path))
    opts = dict(SMALL, noise_rate_hz=20.0)  # noise, so that the seed matters
    a = get_dataset("digits", "test", cache=False, emulator_seed=3, **opts)
    assert list(tmp_path.iterdir()) == []  # cache=False writes nothing
    assert a.frames.shape == (360, 4, 2, 16, 16) and a.frames.dtype == np.uint8
    b = get_dataset("digits", "test", emulator_seed=3, **opts)  # built again, then cached
    assert np.array_equal(a.frames, b.frames)
    c = get_dataset("digits", "test", emulator_seed=4, **opts)
    assert not np.array_equal(a.frames, c.frames)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and all(n.endswith(".npz") for n in names)  # no collision, no .tmp
    reloaded = get_dataset("digits", "train", emulator_seed=3, **opts)
    assert len(reloaded) == 1437 and len(list(tmp_path.iterdir())) == 2
    # The split never depends on the emulator seed.
    assert np.array_equal(a.labels, c.labels)


def test_make_loaders_time_first_and_seeded(digits_cache, monkeypatch):
    path, _, _ = digits_cache
    monkeypatch.setenv("HQ_PTQ_CACHE", str(path))
    train, test = make_loaders("digits", batch_size=16, seed=5)
    x, y = next(iter(train))
    assert x.shape == (8, 16, 2, 32, 32) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64
    same = next(iter(make_loaders("digits", batch_size=16, seed=5)[0]))[1]
    other = next(iter(make_loaders("digits", batch_size=16, seed=6)[0]))[1]
    assert torch.equal(y, same) and not torch.equal(y, other)
    assert sum(len(b[1]) for b in test) == 360


# ----------------------------------------------------------------------------- fashion


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion(tmp_path):
    """Fashion-MNIST idx files with 40 train and 20 test random images."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 20)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz",
                   rng.integers(0, 256, (n, 28, 28)), 0x0803)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10, 0x0801)
    return tmp_path


def test_fashion_missing_files_error_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        get_dataset("fashion", "train", data_dir=tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg
    assert "dataset-fashion-mnist" in msg and "--set data.data_dir=DIR" in msg


def test_fashion_reads_idx_files_and_subsets(tiny_fashion, tmp_path, monkeypatch):
    monkeypatch.setenv("HQ_PTQ_CACHE", str(tmp_path / "cache"))
    test = get_dataset("fashion", "test", data_dir=tiny_fashion, **SMALL)
    assert len(test) == 20 and test.labels.tolist() == (np.arange(20) % 10).tolist()
    frames, _ = test[3]
    assert frames.shape == (4, 2, 16, 16) and frames.sum() > 0
    sub = get_dataset("fashion", "train", data_dir=tiny_fashion, train_subset=20, **SMALL)
    again = get_dataset("fashion", "train", data_dir=tiny_fashion, train_subset=20, **SMALL)
    assert len(sub) == 20 and np.bincount(sub.labels).tolist() == [2] * 10
    assert np.array_equal(sub.frames, again.frames)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_default_folder_subset(tmp_path, monkeypatch):
    monkeypatch.setenv("HQ_PTQ_CACHE", str(tmp_path))
    test = get_dataset("fashion", "test", test_subset=100, **SMALL)
    assert len(test) == 100 and np.bincount(test.labels).tolist() == [10] * 10
    assert test[0][0].shape == (4, 2, 16, 16) and test[0][0].sum() > 0


# ----------------------------------------------------------------------------- tonic datasets


@pytest.fixture
def gesture_root(tmp_path):
    """DVSGesture in tonic's layout: two train recordings and one test recording."""
    rng = np.random.default_rng(0)
    base = tmp_path / "DVSGesture"
    for folder, user, labels in (("ibmGestureTrain", "user01_fluorescent", (3, 0)),
                                 ("ibmGestureTest", "user24_led", (5,))):
        d = base / folder / user
        d.mkdir(parents=True)
        for label in labels:
            n = 300 + label
            ev = np.stack([rng.integers(0, 128, n), rng.integers(0, 128, n),
                           rng.integers(0, 2, n), np.sort(rng.integers(0, 5000, n))], axis=1)
            np.save(d / f"{label}.npy", ev)
    return tmp_path


def test_dvs_gesture_fixture_shapes_and_labels(gesture_root):
    pytest.importorskip("tonic")
    train = get_dataset("dvs-gesture", "train", data_dir=gesture_root, T=4, size=32)
    test = get_dataset("dvs-gesture", "test", data_dir=gesture_root, T=4)
    assert len(train) == 2 and len(test) == 1
    assert train.targets == [0, 3] and test.targets == [5]
    frames, label = train[1]
    assert frames.shape == (4, 2, 32, 32) and frames.dtype == torch.float32 and label == 3
    assert frames.sum() == 303  # every event lands in a frame
    assert test[0][0].shape == (4, 2, 128, 128)


def test_dvs_gesture_cache_matches_lazy_frames(gesture_root, tmp_path, monkeypatch):
    pytest.importorskip("tonic")
    monkeypatch.setenv("HQ_PTQ_CACHE", str(tmp_path / "cache"))
    lazy = get_dataset("dvs-gesture", "train", data_dir=gesture_root, T=4, size=32)
    cached = get_dataset("dvs-gesture", "train", data_dir=gesture_root, T=4, size=32, cache=True)
    for i in range(2):
        assert torch.equal(lazy[i][0], cached[i][0]) and lazy[i][1] == cached[i][1]


def _write_caltech_bin(path: Path, n: int, rng: np.random.Generator) -> None:
    x = rng.integers(0, 240, n)
    y = rng.integers(0, 180, n)
    p = rng.integers(0, 2, n)
    t = np.sort(rng.integers(0, 2**20, n))
    raw = np.stack([x, y, (p << 7) | ((t >> 16) & 127), (t >> 8) & 255, t & 255], axis=1)
    path.write_bytes(raw.astype(np.uint8).tobytes())


@pytest.fixture
def caltech_root(tmp_path):
    """N-Caltech101 in tonic's layout: 10 'airplanes' and 3 'ant' recordings (.bin, 5 B/event)."""
    rng = np.random.default_rng(0)
    for cls, n_files in (("airplanes", 10), ("ant", 3)):
        d = tmp_path / "NCALTECH101" / "Caltech101" / cls
        d.mkdir(parents=True)
        for i in range(n_files):
            _write_caltech_bin(d / f"image_{i + 1:04d}.bin", 200, rng)
    return tmp_path


def test_n_caltech101_fixture_split_shapes_and_labels(caltech_root):
    pytest.importorskip("tonic")
    train = get_dataset("n-caltech101", "train", data_dir=caltech_root, T=5, size=64)
    test = get_dataset("n-caltech101", "test", data_dir=caltech_root, T=5, size=64)
    # ceil(0.9 * n) of each class, taken from its front: 9 + 3 train, 1 + 0 test.
    assert (len(train), len(test)) == (12, 1)
    assert train.targets == [0] * 9 + [1] * 3 and test.targets == [0]
    assert train.classes == ("airplanes", "ant")
    frames, label = test[0]
    assert frames.shape == (5, 2, 64, 64) and label == 0 and frames.sum() == 200
    full = get_dataset("n-caltech101", "test", data_dir=caltech_root / "NCALTECH101", size=None)
    assert full[0][0].shape == (16, 2, 180, 240)


@pytest.mark.parametrize(
    "name, folder",
    [("dvs-gesture", "DVSGesture/ibmGestureTrain"), ("cifar10-dvs", "CIFAR10DVS"),
     ("n-caltech101", "NCALTECH101/Caltech101")],
)
def test_missing_folder_error_explains_layout(tmp_path, name, folder):
    with pytest.raises(FileNotFoundError) as err:
        get_dataset(name, "train", data_dir=tmp_path)
    msg = str(err.value)
    assert folder in msg and "download=True" in msg and str(tmp_path) in msg


def test_dvs_needs_data_dir():
    with pytest.raises(ValueError, match="data_dir"):
        get_dataset("dvs-gesture", "train")


def test_blocked_download_raises_instead_of_fetching(tmp_path):
    tonic = pytest.importorskip("tonic")
    from hq_ptq.data.dvs import _GESTURE, _local_tonic_class

    cls = _local_tonic_class(tonic.datasets.DVSGesture, _GESTURE, allow_download=False)
    with pytest.raises(FileNotFoundError, match="ibmGestureTrain"):
        cls(str(tmp_path), train=True)


@pytest.mark.skipif(importlib.util.find_spec("aedat") is not None, reason="aedat is installed")
def test_cifar10_dvs_names_the_missing_reader(tmp_path):
    pytest.importorskip("tonic")
    d = tmp_path / "CIFAR10DVS" / "airplane"
    d.mkdir(parents=True)
    (d / "cifar10_airplane_0.aedat4").write_bytes(b"")
    with pytest.raises(ImportError, match="pip install aedat"):
        get_dataset("cifar10-dvs", "train", data_dir=tmp_path)


def test_missing_tonic_names_the_extra(gesture_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "tonic", None)  # makes `import tonic` fail
    with pytest.raises(ImportError, match=r"hq-ptq\[dvs\]"):
        get_dataset("dvs-gesture", "train", data_dir=gesture_root)


def test_validation_split_is_held_out_training_data():
    from hq_ptq.data.registry import split_subset

    labels = np.repeat(np.arange(10), 50)  # 500 "training" samples, 10 classes
    val = split_subset(labels, "val", None, None, val_subset=100)
    train = split_subset(labels, "train", None, None, val_subset=100)
    assert len(val) == 100 and len(train) == 400 and not set(val) & set(train)
    assert np.bincount(labels[val]).tolist() == [10] * 10  # stratified
    # with a training subset, val comes from what the subset leaves out and the subset is unchanged
    sub = split_subset(labels, "train", 200, None)
    assert np.array_equal(split_subset(labels, "train", 200, None, val_subset=50), sub)
    val2 = split_subset(labels, "val", 200, None, val_subset=50)
    assert len(val2) == 50 and not set(val2) & set(sub)
    assert np.array_equal(val2, split_subset(labels, "val", 200, None, val_subset=50))  # fixed
    with pytest.raises(ValueError, match="split 'val' needs val_subset=N"):
        split_subset(labels, "val", None, None)
    with pytest.raises(ValueError, match="val_subset=400 must be .* less than the 300 training samples"):
        split_subset(labels, "val", 200, None, val_subset=400)


def test_digits_validation_split_from_the_registry():
    val = get_dataset("digits", "val", val_subset=100)
    train = get_dataset("digits", "train", val_subset=100)
    assert len(val) == 100 and len(train) == 1437 - 100
    held_out = {val[i][0].numpy().tobytes() for i in range(len(val))}
    assert len(held_out) == 100  # every sample distinct, so the check below means something
    assert not any(train[i][0].numpy().tobytes() in held_out for i in range(len(train)))
    with pytest.raises(ValueError, match="has no validation split"):
        get_dataset("dvs-gesture", "val", data_dir="/nonexistent")
