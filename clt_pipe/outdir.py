"""Output directories (fit runs, analysis reports, atlases, exports): one writer at a time, never inside a store.

``hold_out_dir(path, command)`` is the one way in: it refuses a folder inside an activation store (``harvest
--overwrite`` of the store would delete it with the store), then takes ``writer.lock`` in the folder, the
store's harvest lock under another name (clt_pipe/store/lock.py: a ``flock`` the kernel drops when its holder
dies, SIGKILL included). A second command writing into the same folder is refused in one line naming the
holder (command, pid, host) before it looks at or deletes anything, so ``--overwrite`` never removes a run
that another process is still writing. A command that created the folder and wrote nothing into it (refused
on bad input) removes it again. Re-entrant within a process (a pipeline or sweep may hold a folder and
call a stage that takes it again).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterator

from clt_pipe.errors import ConfigError
from clt_pipe.store import format as F
from clt_pipe.store import lock as store_lock
from clt_pipe.store.location import StoreLocation

LOCK_FILE = "writer.lock"


def enclosing_store(path: str | Path) -> Path | None:
    """The clt-pipe store that ``path`` (or its nearest existing ancestor) lies in, if any."""
    p = Path(path).resolve()
    for folder in (p, *p.parents):
        meta = folder / "zarr.json"
        if meta.is_file():
            try:
                attrs = json.loads(meta.read_text()).get("attributes") or {}
            except (OSError, ValueError):
                continue
            if F.ATTRS_KEY in attrs:
                return folder
    return None


def refuse_inside_store(path: str | Path) -> None:
    store = enclosing_store(path)
    if store is not None:
        raise ConfigError(f"out: {path} is inside the activation store {store}; a store holds only what harvest "
                          f"writes (harvest --overwrite deletes the whole store): choose a folder outside it")


@contextlib.contextmanager
def hold_out_dir(path: str | Path, command: str) -> Iterator[Path]:
    """Create ``path`` if needed and hold it as ``command``'s output folder until the block ends."""
    refuse_inside_store(path)
    created = not Path(path).exists()
    lock = store_lock.acquire(StoreLocation(str(path)), name=LOCK_FILE, command=command)
    try:
        yield Path(path)
    finally:
        try:
            if created and lock.outermost and [p.name for p in Path(path).iterdir()] == [LOCK_FILE]:
                lock.remove_file()  # refused before writing anything: leave no folder behind
                Path(path).rmdir()
        except OSError:
            pass  # an empty folder left behind is harmless
        finally:
            lock.release()


def clear_out_dir(path: str | Path) -> None:
    """Delete everything in a held output folder but its lock (``--overwrite``): deleting the lock file would
    let a third process lock a fresh file while this one still writes."""
    for entry in Path(path).iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
