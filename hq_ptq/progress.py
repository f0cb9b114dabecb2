"""Progress bars for long steps, shared by the library and the CLI.

One rich ``Progress`` display is shared by nested steps (rich allows a single live display at a time), and it
writes to stderr so stdout stays clean for tables and JSON. ``HQ_PTQ_PROGRESS=0`` or ``set_enabled(False)``
turns every bar off (CI, tests, batch jobs).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_enabled = os.environ.get("HQ_PTQ_PROGRESS", "1") != "0"
_active: Progress | None = None


def set_enabled(enabled: bool) -> None:
    """Turn progress bars on or off for this process."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    return _enabled


@contextmanager
def task(description: str, total: int | None, completed: int = 0) -> Iterator[Callable[..., None]]:
    """Show a bar for one step (``completed`` of ``total`` already done, e.g. by a resumed run); yields
    ``update(advance=1, **fields)``.

    Example:
        with task("calibrate", total=len(batches)) as update:
            for batch in batches:
                ...
                update()
    """
    global _active
    if not _enabled:
        yield lambda *a, **k: None
        return
    owner = _active is None
    if owner:
        _active = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        _active.start()
    progress = _active
    task_id = progress.add_task(description, total=total, completed=completed, info="")

    def update(advance: float = 1, **fields: object) -> None:
        info = " ".join(f"{k}={v}" for k, v in fields.items())
        progress.update(task_id, advance=advance, **({"info": info} if fields else {}))

    try:
        yield update
    finally:
        if owner:
            progress.stop()
            _active = None
        else:
            progress.remove_task(task_id)
