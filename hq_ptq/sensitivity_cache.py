"""The JSON cache of sensitivity traces (and the Omega table: for inspection, or as the measured result of
metric ``"loss"``, :func:`cached_table`): :func:`table_to_json`,
:func:`table_from_json`, the :func:`fingerprint` of a trace computation (model weights, layers, metric
and options) and :func:`cached_traces`, which recomputes only when the fingerprint differs. The traces
themselves come from :mod:`hq_ptq.sensitivity`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hq_ptq.files import atomic_write_text
from hq_ptq.sensitivity import Candidate, Table

logger = logging.getLogger("hq_ptq.sensitivity")  # the logger these messages had before the split

CACHE_VERSION = 1


def _candidate_key(c: Candidate) -> str:
    return f"{c[0]}:{int(c[1])}"


def _parse_candidate_key(key: str) -> Candidate:
    scheme, sep, bits = key.rpartition(":")
    if not sep or not scheme:
        raise ValueError(f"bad candidate key {key!r} in cache; expected 'scheme:bits'")
    return scheme, int(bits)


def table_to_json(
    table: Table | None,
    traces: Mapping[str, float],
    path: str | os.PathLike[str],
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write traces, table (``"scheme:bits"`` keys) and meta to ``path`` atomically."""
    doc = {
        "version": CACHE_VERSION,
        "meta": dict(meta or {}),
        "traces": {n: float(t) for n, t in traces.items()},
        "table": {
            n: {_candidate_key(c): float(v) for c, v in row.items()} for n, row in (table or {}).items()
        },
    }
    atomic_write_text(Path(path), json.dumps(doc, indent=1, sort_keys=False))


def table_from_json(path: str | os.PathLike[str]) -> tuple[Table, dict[str, float], dict[str, Any]]:
    """Read a file written by :func:`table_to_json`; returns ``(table, traces, meta)``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"sensitivity cache {str(p)!r} not found; compute it first")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        if doc.get("version") != CACHE_VERSION:
            raise ValueError(f"version {doc.get('version')!r} != {CACHE_VERSION}")
        traces = {str(n): float(t) for n, t in doc["traces"].items()}
        table = {
            str(n): {_parse_candidate_key(k): float(v) for k, v in row.items()}
            for n, row in doc["table"].items()
        }
        meta = dict(doc["meta"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"sensitivity cache {str(p)!r} is malformed ({exc}); delete it") from None
    return table, traces, meta


def fingerprint(
    model: nn.Module,
    layer_names: Iterable[str],
    metric: str,
    n_batches: int,
    seed: int,
    **options: Any,
) -> str:
    """Hex digest identifying a trace computation.

    Covers the layer names and weight shapes, the bytes of every parameter and buffer of ``model``
    (BatchNorm statistics change the Hessian too), the metric, batch count, seed and any extra
    ``options`` (rel_tol, sample caps, a data-set tag, ...; JSON-able or str-able values).
    """
    modules = dict(model.named_modules())
    h = hashlib.blake2b(digest_size=16)
    header: dict[str, Any] = {
        "version": CACHE_VERSION,
        "metric": metric,
        "n_batches": int(n_batches),
        "seed": int(seed),
        "options": options,
        "layers": [],
    }
    for name in layer_names:
        if name not in modules:
            raise KeyError(f"layer {name!r} is not a submodule of the model; check the layer names")
        w = getattr(modules[name], "weight", None)
        header["layers"].append([name, list(w.shape) if isinstance(w, torch.Tensor) else None])
    h.update(json.dumps(header, sort_keys=True, default=str).encode())
    for key, t in model.state_dict(keep_vars=False).items():
        if not isinstance(t, torch.Tensor):
            continue
        h.update(key.encode())
        h.update(str((t.dtype, tuple(t.shape))).encode())
        flat = t.detach().reshape(-1).contiguous().cpu()
        # Raw bytes: exact and fast; view as uint8 also handles dtypes numpy lacks (bf16).
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_fresh(p: Path, fingerprint: str, what: str) -> tuple[Table, dict[str, float]] | None:
    """``(table, traces)`` saved at ``p`` under ``fingerprint``; None when absent, malformed or stale."""
    if not p.is_file():
        return None
    try:
        table, traces, old_meta = table_from_json(p)
    except ValueError as exc:
        logger.warning("%s; recomputing", exc)
        return None
    if old_meta.get("fingerprint") != fingerprint:
        logger.info("sensitivity cache %s is stale (fingerprint differs); recomputing", p)
        return None
    logger.info("sensitivity %s loaded from %s", what, p)
    return table, traces


def cached_traces(
    path: str | os.PathLike[str],
    fingerprint: str,
    compute: Callable[[], dict[str, float]],
    *,
    table: Callable[[dict[str, float]], Table] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Load traces from ``path`` if its fingerprint matches, else ``compute()`` and save them.

    ``table`` (optional) builds the Omega table from the traces so the saved JSON can be
    inspected; ``meta`` adds fields to the saved meta. A malformed or stale cache is recomputed.
    """
    p = Path(path)
    saved = _load_fresh(p, fingerprint, "traces")
    if saved is not None:
        return saved[1]
    traces = dict(compute())
    full_meta = {**dict(meta or {}), "fingerprint": fingerprint}
    table_to_json(table(traces) if table is not None else None, traces, p, full_meta)
    logger.info("sensitivity traces saved to %s", p)
    return traces


def cached_table(
    path: str | os.PathLike[str],
    fingerprint: str,
    compute: Callable[[], Table],
    *,
    meta: Mapping[str, Any] | None = None,
) -> Table:
    """Load a measured score table (metric ``"loss"``) from ``path`` if its fingerprint matches, else
    ``compute()`` and save it. The fingerprint must cover the candidates of every row (a different row set
    is a different table). A malformed or stale cache is recomputed."""
    p = Path(path)
    saved = _load_fresh(p, fingerprint, "table")
    if saved is not None:
        return saved[0]
    table = compute()
    table_to_json(table, {}, p, {**dict(meta or {}), "fingerprint": fingerprint})
    logger.info("sensitivity table saved to %s", p)
    return table
