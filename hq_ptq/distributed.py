"""Data-parallel runs on torch.distributed: who computes which batch, the few collectives hq_ptq needs, and a
launcher for ``hq-ptq run --nproc N``.

The contract: every rank is given the *same* calibration and training batches in the same order (same
loaders, same seed), and rank ``r`` of ``N`` computes on global batches ``r, r+N, ...``. Sensitivity samples
computed on one rank are summed over ranks, so every rank ends with the traces (and the plan) one process
would produce. QAT wraps the model in DistributedDataParallel; rank 0 alone writes files.

Backends: gloo for CPU tensors, NCCL for CUDA ones when CUDA is present (``"cpu:gloo,cuda:nccl"``).

Command lines: ``torchrun --nproc-per-node 2 -m hq_ptq run RECIPE`` or ``hq-ptq run RECIPE --nproc 2``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from hq_ptq.files import atomic_write

__all__ = [
    "Shard",
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "cached_on_main",
    "check_same",
    "current_shard",
    "default_backend",
    "init_from_env",
    "is_active",
    "is_main",
    "launch",
    "rank",
    "shutdown",
    "world_size",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
ReduceFn = Callable[[torch.Tensor], torch.Tensor]

# errors about the user's input travel from a worker to the launching process as the same type
_USER_ERRORS: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "FileNotFoundError": FileNotFoundError,
    "KeyError": KeyError,
}


@dataclass(frozen=True)
class Shard:
    """This process's share of a data-parallel computation.

    Attributes:
        rank: this process, ``0 <= rank < world``.
        world: number of processes.
        reduce: elementwise sum of a tensor over all ranks (every rank calls it with the same shape and gets
            the sum back); anything with these semantics works, e.g. threads in a test.
    """

    rank: int
    world: int
    reduce: ReduceFn

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world - 1}")

    def owns(self, index: int) -> bool:
        """Whether global batch ``index`` is computed on this rank."""
        return index % self.world == self.rank

    def take(self, items: Sequence[T]) -> list[T]:
        """This rank's items of a global list: ``items[rank::world]``."""
        return list(items[self.rank :: self.world])


def is_active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """True on rank 0 and in a single process: the one that writes files and prints."""
    return rank() == 0


def _sum(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def current_shard() -> Shard | None:
    """The torch.distributed shard of this process, or None in a single process."""
    if not is_active():
        return None
    return Shard(rank=dist.get_rank(), world=dist.get_world_size(), reduce=_sum)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_active():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects; returns ``obj`` in a single process)."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def data_digest(tensors: Iterable[torch.Tensor]) -> str:
    """Short hex digest of the first 64 KiB of each tensor: tells data sets apart (ranks given different
    batches, a cache computed on other calibration data) without hashing all of it."""
    raw = b"".join(t.detach().cpu().numpy().tobytes()[:65536] for t in tensors)
    return hashlib.sha256(raw).hexdigest()[:16]


def check_same(value: Any, what: str) -> None:
    """Raise ValueError on every rank when ranks hold different ``value`` (e.g. digests of their data)."""
    values = all_gather_object(value)
    odd = [r for r, v in enumerate(values) if v != values[0]]
    if odd:
        raise ValueError(
            f"{what} differs between rank 0 and rank(s) {odd}; give every rank the same data in the same "
            "order (same loaders and seed): hq_ptq shards it itself"
        )


def cached_on_main(cached: Callable[[Callable[[], T]], T], compute: Callable[[], T]) -> T:
    """``cached(compute)`` on rank 0 only (a load-or-compute-and-save cache), ``compute`` collectively.

    Rank 0 consults the cache; when it misses, every rank runs ``compute`` (which may hold collectives) and
    rank 0 saves the value; when it hits, the other ranks receive rank 0's value. So one process reads and
    writes the cache file and no rank waits in a collective the others skip.
    """
    if not is_active():
        return cached(compute)
    if dist.get_rank() == 0:
        missed = []

        def on_miss() -> T:
            broadcast_object(("miss", None))
            missed.append(True)
            return compute()

        value = cached(on_miss)
        if not missed:
            broadcast_object(("hit", value))
        return value
    kind, value = broadcast_object(None)
    return compute() if kind == "miss" else value


def default_backend() -> str:
    """gloo for CPU tensors, plus NCCL for CUDA tensors when CUDA is available."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(timeout_s: float = 1800.0) -> bool:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1); True when joined.

    Idempotent: an initialised group is kept. Without ``WORLD_SIZE`` (or with 1) nothing happens.
    """
    if dist.is_initialized():
        return is_active()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world} but {', '.join(missing)} unset; launch with torchrun or hq-ptq run --nproc"
        )
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    dist.init_process_group(backend=default_backend(), timeout=timedelta(seconds=timeout_s))
    log.info("rank %d of %d joined the process group (%s)", dist.get_rank(), world, dist.get_backend())
    return True


def shutdown() -> None:
    """Leave the process group if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        # a DistributedDataParallel still waiting to be collected frees its reducer during teardown while
        # holding the GIL that gloo's thread needs: a deadlock seen on CPU torch 2.13 (the DDP smoke test of
        # benchmarks/gpu_check.py, in most runs). Collect first, so no reducer outlives the group.
        gc.collect()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# launcher


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    index: int, fn: Callable[..., Any], args: tuple, kwargs: dict, nproc: int, port: int, box: str, show: bool
) -> None:
    from hq_ptq import progress

    os.environ.update(
        RANK=str(index),
        LOCAL_RANK=str(index),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    else:  # as torchrun: share the cores instead of oversubscribing them N times
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    progress.set_enabled(show and index == 0)
    try:
        init_from_env()
        value = fn(*args, **kwargs)
        if index == 0:
            atomic_write(Path(box) / "result.pkl", lambda tmp: Path(tmp).write_bytes(pickle.dumps(value)))
    except Exception as err:
        doc = {
            "time": time.time(),  # the first failure is the cause; later ones are peers losing their link
            "type": type(err).__name__,
            "message": err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err),
            "user": isinstance(err, tuple(_USER_ERRORS.values())),
            "traceback": traceback.format_exc(),
        }
        atomic_write(Path(box) / f"error-{index}.json", lambda tmp: Path(tmp).write_text(json.dumps(doc)))
        raise SystemExit(1) from None  # non-zero exit: spawn stops the other ranks
    finally:
        shutdown()


def launch(fn: Callable[..., T], nproc: int, *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` in ``nproc`` processes joined in one process group; rank 0's return value.

    Processes are started with torch.multiprocessing (spawn) on 127.0.0.1, so ``fn`` and its arguments must be
    picklable (a module-level function). ``OMP_NUM_THREADS`` sets each process's torch threads (default: the
    cores divided among the processes). A user error (ValueError, FileNotFoundError, KeyError) on any rank
    is raised here with its message; any other failure as RuntimeError naming the rank.
    """
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    from hq_ptq import progress

    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if nproc == 1:
        return fn(*args, **kwargs)
    with tempfile.TemporaryDirectory(prefix="hq_ptq-launch-") as box:
        port = _free_port()
        try:
            mp.start_processes(
                _worker,
                args=(fn, args, kwargs, nproc, port, box, progress.enabled()),
                nprocs=nproc,
                join=True,
                start_method="spawn",
            )
        except ProcessException as exc:
            found = Path(box).glob("error-*.json")
            errors = [(json.loads(p.read_text()), int(p.stem.split("-")[1])) for p in found]
            if not errors:
                raise RuntimeError(f"a worker process died without a Python error ({exc})") from None
            first, index = min(errors, key=lambda e: (e[0]["time"], e[1]))
            if first["user"]:
                raise _USER_ERRORS.get(first["type"], ValueError)(first["message"]) from None
            log.error("rank %s failed:\n%s", index, first["traceback"])
            raise RuntimeError(f"rank {index} failed: {first['type']}: {first['message']}") from None
        with open(Path(box) / "result.pkl", "rb") as fh:
            return pickle.load(fh)  # written by our own rank 0 a moment ago
