"""One harvest at a time per store: ``harvest.lock`` inside the store.

Local file systems: an exclusive ``flock`` on the file. The kernel drops it when the holder exits, SIGKILL
included, so a killed harvest never leaves a stale lock behind.

Object stores: a lease object created with a conditional write (``If-None-Match: *``, which S3 and
S3-compatible servers that support it refuse when the object exists), holding the owner's id, host, pid and
expiry; a heartbeat thread renews it every LEASE_S/3 seconds. It is stale (taken over) when its expiry has
passed, or when it names a process of this host that is no longer running. Backends that ignore the condition
still see the owner id read back after the write, which narrows (not closes) the window of a simultaneous
creation; see storage/FORMAT.md, "Locking".

A process that already holds a store's lock may open that store again (the test helpers do, and the
coordinating process of a multi-writer harvest); only other processes are refused.

The same lock, under another file name, keeps one writer per output directory (fit runs, reports, atlases,
exports: clt_pipe/outdir.py).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from clt_pipe.errors import StoreError, is_precondition_failed
from clt_pipe.store import format as F
from clt_pipe.store.location import StoreLocation

LOCK_FILE = F.LOCK_FILE
LEASE_S = 120.0

_held: dict[str, "HarvestLock"] = {}  # per process: store root -> its lock
_held_guard = threading.Lock()


def _owner(command: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _refusal(url: str, info: dict, command: str) -> StoreError:
    who = f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('since', '?')}"
    if command == "harvest":
        return StoreError(f"another harvest is writing {url} ({who}); wait for it to finish, then re-run this "
                          f"command (it resumes or finds the store complete)")
    holder = info.get("command", "?")
    return StoreError(f"{url} is in use: `clt-pipe {holder}` is writing it ({who}); wait for it to finish or "
                      f"choose another --out")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class HarvestLock:
    def __init__(self, loc: StoreLocation, name: str = LOCK_FILE, command: str = "harvest"):
        self.loc = loc
        self.key = f"{loc.root.rstrip('/')}/{name}"
        self.command = command
        self._fd: int | None = None
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._count = 0

    # ---- local -----------------------------------------------------------------------------------------
    def _acquire_local(self) -> None:
        import fcntl

        while True:
            os.makedirs(self.loc.root, exist_ok=True)
            fd = os.open(self.key, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    info = json.loads(os.pread(fd, 4096, 0) or b"{}")
                except ValueError:
                    info = {}
                os.close(fd)
                raise _refusal(self.loc.url, info, self.command) from None
            except OSError:
                os.close(fd)
                raise
            if self._still_linked(fd):
                break
            os.close(fd)  # its holder removed the file (remove_file) before we locked it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner(self.command)).encode(), 0)
        self._fd = fd

    def _still_linked(self, fd: int) -> bool:
        try:
            st = os.stat(self.key)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)

    @property
    def outermost(self) -> bool:
        """Only one holder in this process: releasing it releases the lock."""
        return self._count == 1

    def remove_file(self) -> None:
        """Delete the local lock file while still holding it (its folder is going away); a process that opened
        it meanwhile finds it unlinked once it gets the lock, and locks a new file instead."""
        if self._fd is not None:
            os.unlink(self.key)

    # ---- object stores ---------------------------------------------------------------------------------
    def _lease(self) -> bytes:
        return json.dumps(dict(_owner(self.command), token=self._token, expires=time.time() + LEASE_S)).encode()

    def _read_lease(self) -> dict | None:
        try:
            return json.loads(self.loc.fs.cat_file(self.key))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}

    def _stale(self, info: dict) -> bool:
        if not info or float(info.get("expires", 0)) < time.time():
            return True
        return info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", 0)))

    def _acquire_remote(self) -> None:
        for _attempt in range(2):
            try:
                self.loc.fs.pipe_file(self.key, self._lease(), mode="create")
            except OSError as e:
                if not is_precondition_failed(e):
                    raise
                info = self._read_lease()
                if info is not None and not self._stale(info):
                    raise _refusal(self.loc.url, info, self.command) from None
                self.loc.fs.rm(self.key)  # stale lease: take it over
                continue
            info = self._read_lease()
            if info is not None and info.get("token") != self._token:
                raise _refusal(self.loc.url, info, self.command)
            self._beat = threading.Thread(target=self._renew, name="clt-lease", daemon=True)
            self._beat.start()
            return
        raise _refusal(self.loc.url, self._read_lease() or {}, self.command)

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_S / 3):
            try:
                self.loc.fs.pipe_file(self.key, self._lease())
            except Exception:  # noqa: BLE001 - a missed renewal only shortens the lease
                pass

    # ---- both ------------------------------------------------------------------------------------------
    def release(self) -> None:
        with _held_guard:
            self._count -= 1
            if self._count > 0:
                return
            _held.pop(self.key, None)
        if self._fd is not None:
            os.close(self._fd)  # drops the flock; the file stays (deleting it would race a new opener)
            self._fd = None
        elif self._beat is not None:
            self._stop.set()
            self._beat.join()
            self._beat = None
            try:
                info = self._read_lease()
                if info is not None and info.get("token") == self._token:
                    self.loc.fs.rm(self.key)
            except Exception:  # noqa: BLE001 - an unremoved lease expires by itself
                pass


def acquire(loc: StoreLocation, name: str = LOCK_FILE, command: str = "harvest") -> HarvestLock:
    """This process's lock on the store (re-entrant within the process); refuses in one line if another
    process holds it. ``name``/``command``: another lock file in the folder, and the command named to a
    process that is refused."""
    key = f"{loc.root.rstrip('/')}/{name}"
    with _held_guard:
        lock = _held.get(key)
        if lock is None:
            lock = HarvestLock(loc, name, command)
            with loc.errors("write to"):
                if loc.is_local:
                    lock._acquire_local()
                else:
                    lock._acquire_remote()
            _held[key] = lock
        lock._count += 1
        return lock
