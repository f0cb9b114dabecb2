"""A small, vectorised DVS (event camera) emulator and event-to-frame binning.

The emulator follows the usual log-intensity model (ESIM / v2e style): every pixel keeps a
reference log-intensity; whenever the current log-intensity moves a contrast ``threshold`` away
from it, the pixel emits an event (ON when brighter, OFF when darker) and the reference moves by
one threshold. Between two video frames the log-intensity is interpolated linearly, so a large
change gives several events whose timestamps are spread over the step.

Events use tonic's structured layout (``x``, ``y``, ``t``, ``p``) with ``t`` in microseconds and
``p`` in {0 (OFF), 1 (ON)}; frames are ``(T, 2, H, W)`` with channel 0 = OFF, 1 = ON.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

EVENT_DTYPE = np.dtype([("x", "<i2"), ("y", "<i2"), ("t", "<i8"), ("p", "<i1")])

#: Default time between two video frames when no timestamps are given (1 ms).
DEFAULT_FRAME_US = 1000.0

# Guards against float round-off: 0.6 / 0.2 must count as 3 crossings, not 2.
_CROSS_TOL = 1e-9


def _emulate(
    log_frames: np.ndarray,
    t_us: np.ndarray,
    *,
    threshold: float,
    refractory_us: float,
    noise_rate_hz: float,
    rng: np.random.Generator | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Core emulator on flattened pixels.

    Args:
        log_frames: ``(S, P)`` log-intensities, one row per video frame.
        t_us: ``(S,)`` strictly increasing frame times in microseconds (float).
        threshold: contrast threshold in log units.
        refractory_us: minimum time between two events of one pixel.
        noise_rate_hz: background-activity rate per pixel.
        rng: generator for the noise events (unused when the rate is 0).

    Returns:
        ``(pixel, t, p)``: int64 pixel indices, int64 times (rounded microseconds), int8
        polarities, ordered by time; equal times of one step are in pixel (raster) order.
    """
    n_steps, n_pix = log_frames.shape
    ref = log_frames[0].astype(np.float64, copy=True)
    last_t = np.full(n_pix, -np.inf)
    pix_parts: list[np.ndarray] = []
    t_parts: list[np.ndarray] = []
    p_parts: list[np.ndarray] = []

    for s in range(1, n_steps):
        l0 = log_frames[s - 1]
        l1 = log_frames[s]
        diff = l1 - ref
        k = np.floor(np.abs(diff) / threshold + _CROSS_TOL).astype(np.int64)
        active = np.flatnonzero(k)
        if active.size == 0:
            continue
        ka = k[active]
        sign = np.sign(diff[active])
        ref_a = ref[active]
        l0a = l0[active].astype(np.float64)
        span = l1[active].astype(np.float64) - l0a
        # The reference always ends within one threshold of l1, so each crossing level
        # ref + j*C*sign lies inside (l0, l1]; the guard only protects against round-off.
        safe_span = np.where(np.abs(span) > 1e-12, span, np.where(sign >= 0, 1e-12, -1e-12))
        dt = float(t_us[s] - t_us[s - 1])
        # Times of the j-th crossing are t_first + (j-1)*delta (linear interpolation).
        frac_first = np.clip((ref_a + sign * threshold - l0a) / safe_span, 0.0, 1.0)
        t_first = t_us[s - 1] + frac_first * dt
        delta = threshold * dt / np.abs(safe_span)

        total = int(ka.sum())
        owner = np.repeat(np.arange(active.size), ka)
        starts = np.cumsum(ka) - ka
        j = np.arange(total) - np.repeat(starts, ka)  # 0-based crossing index per pixel
        t_ev = np.minimum(t_first[owner] + j * delta[owner], float(t_us[s]))

        if refractory_us > 0:
            # Greedy refractory filter in closed form: crossings are equally spaced, so the kept
            # ones are the first crossing after (last event + refractory) and then every m-th.
            la = last_t[active]
            j0 = np.ceil((la + refractory_us - t_first) / delta - _CROSS_TOL)
            j0 = np.clip(np.nan_to_num(j0, neginf=0.0), 0, None).astype(np.int64)
            stride = np.maximum(1, np.ceil(refractory_us / delta - _CROSS_TOL)).astype(np.int64)
            rel = j - j0[owner]
            keep = (rel >= 0) & (rel % stride[owner] == 0)
            kept_owner = owner[keep]
            if kept_owner.size:
                # Events of one pixel are in increasing time order, so the maximum is the last.
                np.maximum.at(last_t, active[kept_owner], t_ev[keep])
            owner, t_ev = kept_owner, t_ev[keep]
        # Crossings silenced by the refractory period still move the reference: a real pixel
        # resets to the current level when it recovers, so that change is lost, not deferred.
        ref[active] = ref_a + sign * ka * threshold

        # Order each step by (integer time, pixel): a stable sort of rounded times, radix-fast
        # on a 16-bit offset. Steps are concatenated in order, so the whole stream stays sorted.
        t_lo = int(np.rint(t_us[s - 1]))
        t_step = np.rint(t_ev).astype(np.int64)
        offset = t_step - t_lo
        key = offset.astype(np.uint16) if int(np.rint(t_us[s])) - t_lo < 2**16 else offset
        order = np.argsort(key, kind="stable")
        pix_parts.append(active[owner[order]])
        t_parts.append(t_step[order])
        p_parts.append((sign[owner[order]] > 0).astype(np.int8))

    if noise_rate_hz > 0 and n_steps > 1:
        duration_s = float(t_us[-1] - t_us[0]) * 1e-6
        rng = rng if rng is not None else np.random.default_rng(0)
        n_noise = int(rng.poisson(noise_rate_hz * n_pix * duration_s))
        if n_noise:
            pix_parts.append(rng.integers(0, n_pix, n_noise, dtype=np.int64))
            t_parts.append(np.rint(rng.uniform(float(t_us[0]), float(t_us[-1]), n_noise))
                           .astype(np.int64))
            p_parts.append(rng.integers(0, 2, n_noise, dtype=np.int8))

    if not pix_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int8)
    pix = np.concatenate(pix_parts)
    t = np.concatenate(t_parts)
    p = np.concatenate(p_parts)
    if noise_rate_hz > 0:
        # Only the noise is out of order; timsort merges the sorted runs in near-linear time.
        order = np.argsort(t, kind="stable")
        pix, t, p = pix[order], t[order], p[order]
    return pix, t, p


def _check_emulator_args(threshold: float, refractory_us: float, noise_rate_hz: float,
                         eps: float) -> None:
    if not threshold > 0:
        raise ValueError(f"threshold={threshold!r} must be > 0 (a log-contrast, e.g. 0.2)")
    if refractory_us < 0:
        raise ValueError(f"refractory_us={refractory_us!r} must be >= 0 (0 disables it)")
    if noise_rate_hz < 0:
        raise ValueError(f"noise_rate_hz={noise_rate_hz!r} must be >= 0 (0 disables noise)")
    if not eps > 0:
        raise ValueError(f"eps={eps!r} must be > 0; it keeps log(intensity + eps) finite")


def _frame_times(n: int, timestamps_us: np.ndarray | None) -> np.ndarray:
    if timestamps_us is None:
        return np.arange(n, dtype=np.float64) * DEFAULT_FRAME_US
    t = np.asarray(timestamps_us, dtype=np.float64)
    if t.shape != (n,):
        raise ValueError(
            f"timestamps_us has shape {t.shape}, expected ({n},): one time per video frame"
        )
    if n > 1 and not np.all(np.diff(t) > 0):
        raise ValueError("timestamps_us must be strictly increasing (microseconds per frame)")
    return t


def video_to_events(
    frames: np.ndarray,
    timestamps_us: np.ndarray | None = None,
    *,
    threshold: float = 0.2,
    refractory_us: float = 0.0,
    noise_rate_hz: float = 0.0,
    eps: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """Convert a grey-level video into DVS events.

    Args:
        frames: ``(N, H, W)`` non-negative linear intensities (typically in [0, 1]).
        timestamps_us: ``(N,)`` strictly increasing frame times in microseconds; default
            ``1000 * arange(N)`` (1 ms per frame).
        threshold: contrast threshold, in natural-log units, for both polarities.
        refractory_us: a pixel stays silent for this long after each event (0 = off).
        noise_rate_hz: background-activity events per pixel per second, uniform in time,
            random polarity (0 = off).
        eps: added to the intensity before the log, so black pixels stay finite. It plays the
            role of v2e's linear segment near black: with 0.1 a full black-to-white edge gives
            about 12 events at threshold 0.2 instead of 23 with 0.01, and faint changes in the
            dark give few events, as on a real sensor.
        seed: seed of the noise generator.

    Returns:
        Structured array of dtype :data:`EVENT_DTYPE`, sorted by ``t``. The first frame only
        sets the reference levels, so a static video gives no events (apart from noise).

    Raises:
        ValueError: on a wrong shape, negative or non-finite intensities, or a bad option.

    Example:
        >>> video = np.linspace(0.2, 0.8, 5)[:, None, None] * np.ones((5, 2, 2))
        >>> ev = video_to_events(video)
        >>> bool((ev["p"] == 1).all())
        True
    """
    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"frames has shape {frames.shape}; expected (N, H, W) grey levels")
    n, h, w = frames.shape
    if n < 1 or h < 1 or w < 1:
        raise ValueError(f"frames has shape {frames.shape}; every dimension must be >= 1")
    if h > np.iinfo(np.int16).max or w > np.iinfo(np.int16).max:
        raise ValueError(f"frames of {h}x{w} do not fit int16 event coordinates")
    _check_emulator_args(threshold, refractory_us, noise_rate_hz, eps)
    frames64 = frames.astype(np.float64, copy=False)
    if not np.isfinite(frames64).all() or (frames64 < 0).any():
        raise ValueError("frames must be finite, non-negative intensities (e.g. in [0, 1])")
    t = _frame_times(n, timestamps_us)

    log_frames = np.log(frames64.reshape(n, h * w) + eps)
    pix, t_ev, p = _emulate(
        log_frames, t, threshold=threshold, refractory_us=refractory_us,
        noise_rate_hz=noise_rate_hz, rng=np.random.default_rng(seed),
    )
    events = np.empty(pix.size, dtype=EVENT_DTYPE)
    events["y"] = pix // w
    events["x"] = pix % w
    events["t"] = t_ev
    events["p"] = p
    logger.debug("video %s -> %d events", frames.shape, events.size)
    return events


def _count_slices(n_events: np.ndarray | int, ranks: np.ndarray, n_frames: int) -> np.ndarray:
    """Frame index of each event under equal-event-count slicing.

    Follows spikingjelly's ``split_by='number'``: frame i holds events
    ``[i*(N//T), (i+1)*(N//T))`` and the last frame also takes the remainder.
    """
    per = np.asarray(n_events, dtype=np.int64) // n_frames
    idx = np.where(per > 0, ranks // np.maximum(per, 1), n_frames - 1)
    return np.minimum(idx, n_frames - 1)


def _time_slices(t: np.ndarray, n_frames: int) -> np.ndarray:
    """Frame index of each event under equal time bins spanning [t_min, t_max]."""
    t = t.astype(np.int64, copy=False)
    t0 = int(t.min())
    span = int(t.max()) - t0 + 1  # +1 so that the last event falls inside the last bin
    return np.minimum((t - t0) * n_frames // span, n_frames - 1)


def events_to_frames(
    events: np.ndarray,
    sensor_size: tuple[int, int],
    n_frames: int,
    *,
    mode: Literal["count", "time"] = "count",
) -> np.ndarray:
    """Bin events into ``n_frames`` two-channel count frames.

    Args:
        events: structured array with fields ``x``, ``y``, ``t``, ``p`` (``p > 0`` is ON;
            bool or {-1, 1} polarities work too).
        sensor_size: ``(H, W)``; every event must satisfy ``x < W`` and ``y < H``.
        n_frames: number of frames ``T``.
        mode: ``"count"`` slices into equal event counts (spikingjelly ``split_by='number'``,
            as in the Spikformer and Spike-driven Transformer DVS pipelines); ``"time"`` into
            equal time bins between the first and the last event.

    Returns:
        float32 array ``(T, 2, H, W)`` of event counts; channel 0 = OFF, 1 = ON. The sum
        equals the number of events.

    Raises:
        ValueError: on ``n_frames < 1``, an unknown mode, a bad sensor size, missing fields or
            out-of-range coordinates.
    """
    n_frames = int(n_frames)
    if n_frames < 1:
        raise ValueError(f"n_frames={n_frames} must be >= 1")
    if mode not in ("count", "time"):
        raise ValueError(f"mode={mode!r} is unknown; use 'count' (equal events) or 'time'")
    if len(sensor_size) != 2 or min(int(s) for s in sensor_size) < 1:
        raise ValueError(f"sensor_size={sensor_size!r} must be (H, W) with H, W >= 1")
    h, w = int(sensor_size[0]), int(sensor_size[1])
    names = events.dtype.names or ()
    missing = [f for f in ("x", "y", "t", "p") if f not in names]
    if missing:
        raise ValueError(f"events lack the fields {missing}; expected a structured array x,y,t,p")

    out = np.zeros((n_frames, 2, h, w), dtype=np.float32)
    if events.size == 0:
        return out
    x = events["x"].astype(np.int64)
    y = events["y"].astype(np.int64)
    if x.min() < 0 or y.min() < 0 or x.max() >= w or y.max() >= h:
        raise ValueError(
            f"event coordinates x in [{x.min()}, {x.max()}], y in [{y.min()}, {y.max()}] "
            f"do not fit sensor_size=(H={h}, W={w})"
        )
    t = events["t"]
    if mode == "count":
        order = np.argsort(t, kind="stable")
        frame = np.empty(events.size, dtype=np.int64)
        frame[order] = _count_slices(events.size, np.arange(events.size), n_frames)
    else:
        frame = _time_slices(t, n_frames)
    pol = (events["p"].astype(np.int64) > 0).astype(np.int64)
    flat = ((frame * 2 + pol) * h + y) * w + x
    counts = np.bincount(flat, minlength=n_frames * 2 * h * w)
    out[...] = counts.reshape(n_frames, 2, h, w)
    return out


def _videos_to_count_frames(
    videos: np.ndarray,
    t_us: np.ndarray,
    n_frames: int,
    *,
    threshold: float,
    refractory_us: float = 0.0,
    noise_rate_hz: float = 0.0,
    eps: float = 0.1,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Emulate a batch of videos at once and slice each into equal-count frames.

    The batch is laid out as one wide sensor so that a single emulator pass serves every sample;
    this is what keeps dataset conversion fast.

    Args:
        videos: ``(S, N, H, W)`` intensities: S video frames of N samples.
        t_us: ``(S,)`` frame times in microseconds.
        n_frames: T.

    Returns:
        int64 ``(N, T, 2, H, W)`` event counts, identical to calling :func:`video_to_events`
        and :func:`events_to_frames` per sample (noise aside).
    """
    _check_emulator_args(threshold, refractory_us, noise_rate_hz, eps)
    s, n, h, w = videos.shape
    hw = h * w
    log_frames = np.log(videos.reshape(s, n * hw).astype(np.float64) + eps)
    pix, t_ev, p = _emulate(
        log_frames, np.asarray(t_us, dtype=np.float64), threshold=threshold,
        refractory_us=refractory_us, noise_rate_hz=noise_rate_hz, rng=rng,
    )
    # _emulate's stream is time-ordered; a stable sort by sample keeps that order within each
    # sample, which is exactly what events_to_frames sees for a single sample.
    sample = pix // hw
    key = sample.astype(np.int16) if n < 2**15 else sample
    order = np.argsort(key, kind="stable")
    sample, pix, p = sample[order], pix[order], p[order]
    local = pix - sample * hw
    per_sample = np.bincount(sample, minlength=n)
    # Frame ids in sorted order, built by repetition instead of a division per event.
    base = per_sample // n_frames
    reps = np.repeat(base[:, None], n_frames, axis=1)
    reps[:, -1] += per_sample - base * n_frames
    frame = np.repeat(np.tile(np.arange(n_frames, dtype=np.int64), n), reps.ravel())
    flat = ((sample * n_frames + frame) * 2 + p) * hw + local
    counts = np.bincount(flat, minlength=n * n_frames * 2 * hw)
    return counts.reshape(n, n_frames, 2, h, w)
