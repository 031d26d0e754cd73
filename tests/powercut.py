"""A file system for tests that loses, on `cut()`, every write no fsync made durable.

`kill -9` of a process keeps what it wrote in the kernel's page cache, so it cannot show
whether a program syncs what it promised. This FUSE passthrough over a backing directory
holds the writes a power cut would lose in its own memory, and its server runs in a
subprocess (so a test never waits on its own mount):

- **File data.** A `write` or `truncate` is kept in memory, per file (inode), and reads
  through the mount see it. `fsync` or `fdatasync` on any handle of the file applies the
  file's pending writes to the backing file (fsync and fdatasync alike: metadata such as
  times is not modelled). `cut()` kills the server, so whatever was pending is gone; the
  backing file holds exactly what was synced, as a disk would after the power came back.
  Writes are not torn: a write is kept or lost whole, and one sync applies in order.
- **Names (conservative).** Creating, removing or renaming an entry is done in the backing
  directory at once but lasts only once its directory has been fsynced (the destination's,
  for a rename); `cut()` undoes, newest first, every such change made since its directory's
  last fsync. A file created and synced in a directory never synced is therefore gone after
  the cut, as POSIX allows. Removed files wait beside the backing directory until then. The
  undo list is a file (`journal`), so a cut can replay it after the server is dead.
- **What it does not model.** Reordering of writes inside one sync, torn sector writes,
  disks that lie about flushes, and times, modes or owners. Locks (`fcntl`, `flock`) are not
  forwarded, so the kernel keeps them for the mount: every process must use this one mount.
  Pages mapped shared (SQLite's `-shm`) live in the kernel's page cache of the mount and
  reach the server as writes when the kernel writes them back, then are lost like any
  unsynced write; SQLite rebuilds that index from the WAL when it next opens the store.

Run `python -m tests.powercut BACKING MOUNTPOINT STATE` for the server alone; tests use
`PowerCut`. Linux only, needs /dev/fuse, libfuse3 and the right to mount (root).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0


def why_unavailable() -> str | None:
    """Why this machine cannot run the power-cut file system, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "FUSE power-cut tests need Linux"
    if os.geteuid() != 0:
        return "mounting the power-cut file system needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: libfuse itself is missing
        return f"mfusepy over libfuse is not usable: {exc}"
    return None


# --- the server (in its own process) -----------------------------------------


@dataclass
class Pending:
    """A file's writes since its last sync: what a power cut would take back."""

    size: int  # the file's size as its readers see it
    floor: int  # bytes of the backing file still valid (a truncate lowers it)
    extents: list[tuple[int, bytes]] = field(default_factory=list)

    def write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        # Drop what this write covers whole: pages rewritten again and again (the -shm
        # index, a WAL header) would otherwise pile up until the next sync.
        self.extents = [(o, d) for o, d in self.extents if not (offset <= o and o + len(d) <= end)]
        self.extents.append((offset, data))
        self.size = max(self.size, end)

    def truncate(self, length: int) -> None:
        kept: list[tuple[int, bytes]] = []
        for o, d in self.extents:
            if o < length:
                kept.append((o, d[: length - o]))
        self.extents = kept
        self.floor = min(self.floor, length)
        self.size = length

    def read(self, fd: int, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        if offset < self.floor:
            base = os.pread(fd, min(end, self.floor) - offset, offset)
            out[: len(base)] = base
        for o, d in self.extents:
            lo, hi = max(o, offset), min(o + len(d), end)
            if lo < hi:
                out[lo - offset : hi - offset] = d[lo - o : hi - o]
        return bytes(out)

    def apply(self, fd: int) -> None:
        os.ftruncate(fd, self.floor)
        for o, d in self.extents:
            os.pwrite(fd, d, o)
        os.ftruncate(fd, self.size)


def serve(backing: str, mountpoint: str, state: str) -> None:
    """The FUSE server: runs in the foreground until unmounted or killed."""
    import mfusepy

    class Ops(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True
        flag_nopath = True  # ops on an open file get its handle: it may be unlinked
        flag_nullpath_ok = True

        def __init__(self) -> None:
            self.root = os.path.realpath(backing)
            self.state = Path(state)
            self.pending: dict[tuple[int, int], Pending] = {}
            self.undo: list[dict[str, Any]] = []
            self.graves = 0
            self.dirs = 0
            self.opened: dict[int, str] = {}  # directory handles: fsyncdir may get no path

        # paths and bookkeeping
        def _real(self, path: str) -> str:
            return os.path.join(self.root, path.lstrip("/"))

        def _inode(self, fd: int) -> tuple[int, int]:
            st = os.fstat(fd)
            return (st.st_dev, st.st_ino)

        def _pending(self, fd: int) -> Pending:
            key = self._inode(fd)
            found = self.pending.get(key)
            if found is None:
                size = os.fstat(fd).st_size
                found = self.pending[key] = Pending(size=size, floor=size)
            return found

        def _log(self, record: dict[str, Any]) -> None:
            self.undo.append(record)
            with open(self.state / "journal", "a") as journal:
                journal.write(json.dumps(record) + "\n")

        def _rewrite_journal(self) -> None:
            partial = self.state / "journal.partial"
            partial.write_text("".join(json.dumps(r) + "\n" for r in self.undo))
            os.replace(partial, self.state / "journal")

        def _grave(self) -> str:
            self.graves += 1
            return str(self.state / f"grave-{self.graves}")

        @staticmethod
        def _dir(path: str) -> str:
            return os.path.dirname("/" + path.lstrip("/"))

        @staticmethod
        def _fd(fh: Any) -> int:
            return int(fh.fh) if hasattr(fh, "fh") else int(fh)

        # lifecycle
        def init(self, path: str) -> None:
            os.write(1, b"mounted\n")

        # attributes and directories
        def getattr(self, path: str | None, fh: Any = None) -> dict[str, Any]:
            try:
                if fh is not None:
                    fd = self._fd(fh)
                    st = os.fstat(fd)
                else:
                    assert path is not None
                    st = os.lstat(self._real(path))
            except OSError as exc:
                raise mfusepy.FuseOSError(exc.errno) from None
            attrs = {
                key: getattr(st, key)
                for key in (
                    "st_mode",
                    "st_nlink",
                    "st_uid",
                    "st_gid",
                    "st_size",
                    "st_atime_ns",
                    "st_mtime_ns",
                    "st_ctime_ns",
                    "st_ino",
                    "st_blocks",
                )
            }
            for name in ("atime", "mtime", "ctime"):
                attrs[f"st_{name}"] = attrs.pop(f"st_{name}_ns")
            found = self.pending.get((st.st_dev, st.st_ino))
            if found is not None:
                attrs["st_size"] = found.size
            return attrs

        def opendir(self, path: str) -> int:
            self.dirs += 1
            self.opened[self.dirs] = path
            return self.dirs

        def releasedir(self, path: str | None, fh: int) -> int:
            self.opened.pop(fh, None)
            return 0

        def readdir(self, path: str | None, fh: int) -> list[tuple[str, dict[str, int], int]]:
            # With use_ino an entry needs its inode: readdir(3) skips those whose is 0.
            real = self._real(self.opened.get(fh, path or "/"))
            entries = []
            for name in (".", "..", *os.listdir(real)):
                st = os.lstat(os.path.join(real, name))
                entries.append((name, {"st_mode": st.st_mode, "st_ino": st.st_ino}, 0))
            return entries

        def statfs(self, path: str) -> dict[str, Any]:
            st = os.statvfs(self._real(path))
            return {key: getattr(st, key) for key in dir(st) if key.startswith("f_")}

        def access(self, path: str, amode: int) -> int:
            return 0

        def chmod(self, path: str, mode: int) -> int:
            os.chmod(self._real(path), mode)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            os.chown(self._real(path), uid, gid)
            return 0

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            os.utime(self._real(path), ns=times)
            return 0

        # names: done at once, undone by a cut unless the directory was synced
        def create(self, path: str, mode: int, fi: Any) -> int:
            real = self._real(path)
            existed = os.path.lexists(real)
            fi.fh = os.open(real, os.O_RDWR | os.O_CREAT | (fi.flags & os.O_EXCL), mode)
            fi.keep_cache = 1
            if not existed:
                self._log({"op": "new", "path": path, "dir": self._dir(path)})
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            os.mkdir(self._real(path), mode)
            self._log({"op": "new", "path": path, "dir": self._dir(path)})
            return 0

        def unlink(self, path: str) -> int:
            grave = self._grave()
            os.rename(self._real(path), grave)
            self._log({"op": "gone", "path": path, "grave": grave, "dir": self._dir(path)})
            return 0

        rmdir = unlink

        def rename(self, old: str, new: str, flags: int = 0) -> int:
            grave = None
            if os.path.lexists(self._real(new)):
                grave = self._grave()
                os.rename(self._real(new), grave)
            os.rename(self._real(old), self._real(new))
            self._log(
                {"op": "moved", "path": old, "to": new, "grave": grave, "dir": self._dir(new)}
            )
            return 0

        def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
            where = os.path.normpath("/" + self.opened.get(fh, path or "/").lstrip("/"))
            kept = []
            for record in self.undo:
                if record["dir"] == where:
                    if record.get("grave"):
                        grave = record["grave"]
                        if os.path.isdir(grave) and not os.path.islink(grave):
                            shutil.rmtree(grave)
                        else:
                            os.unlink(grave)
                else:
                    kept.append(record)
            self.undo = kept
            self._rewrite_journal()
            return 0

        # file data: pending in memory until a sync
        def open(self, path: str, fi: Any) -> int:
            fi.fh = os.open(self._real(path), os.O_RDWR)
            fi.keep_cache = 1  # only this mount changes the file: the page cache stays right
            if fi.flags & os.O_TRUNC:
                self._pending(fi.fh).truncate(0)
            return 0

        def read(self, path: str | None, size: int, offset: int, fh: Any) -> bytes:
            fd = self._fd(fh)
            found = self.pending.get(self._inode(fd))
            if found is None:
                return os.pread(fd, size, offset)
            return found.read(fd, offset, size)

        def write(self, path: str | None, data: bytes, offset: int, fh: Any) -> int:
            self._pending(self._fd(fh)).write(offset, bytes(data))
            return len(data)

        def truncate(self, path: str | None, length: int, fh: Any = None) -> int:
            if fh is not None:
                self._pending(self._fd(fh)).truncate(length)
                return 0
            if path is None:
                raise mfusepy.FuseOSError(errno.EBADF)
            fd = os.open(self._real(path), os.O_RDWR)
            try:
                self._pending(fd).truncate(length)
            finally:
                os.close(fd)
            return 0

        def fsync(self, path: str | None, datasync: int, fh: Any) -> int:
            fd = self._fd(fh)
            found = self.pending.pop(self._inode(fd), None)
            if found is not None:
                found.apply(fd)
            return 0

        def flush(self, path: str | None, fh: Any) -> int:
            return 0

        def release(self, path: str | None, fh: Any) -> int:
            os.close(self._fd(fh))
            return 0

    class Fuse(mfusepy.FUSE):  # type: ignore[misc]
        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            """mfusepy drops the handle here: an ftruncate would have no file to go by."""
            fh = fip.contents if fip else None
            name = None if path is None else path.decode(self.encoding, self.errors)
            return int(self.operations.truncate(name, length, fh))

    Path(state).mkdir(parents=True, exist_ok=True)
    (Path(state) / "journal").touch()
    Fuse(
        Ops(),
        mountpoint,
        raw_fi=True,
        foreground=True,
        nothreads=True,  # one request at a time: the state above has no locks
        hard_remove=True,  # an unlinked open file is unlinked, not renamed to .fuse_hidden
        use_ino=True,
        attr_timeout=0,
        entry_timeout=0,
        negative_timeout=0,
        default_permissions=True,
    )


# --- the test's side ---------------------------------------------------------


class PowerCut:
    """A mount of the power-cut file system over `backing`, for one test.

    `cut()` is the power failing: the server is killed with what it held, the mount is
    taken down, and the names changed since their directory's last sync are put back.
    `backing` then holds what a disk would after the power came back.
    """

    def __init__(self, backing: Path, mountpoint: Path, state: Path) -> None:
        self.backing, self.mountpoint, self.state = backing, mountpoint, state
        self.proc: subprocess.Popen[bytes] | None = None

    def mount(self, timeout: float = START_TIMEOUT) -> None:
        for folder in (self.backing, self.mountpoint):
            folder.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:  # a file, not a pipe nobody reads that could fill
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.powercut", *map(str, self._paths())],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if line.strip() != b"mounted":
            self.proc.kill()
            self.proc.wait()
            said = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the power-cut mount did not come up: {said}")

    @property
    def log(self) -> Path:
        """The server's stderr: what went wrong inside it, if anything did."""
        return self.state.with_name(self.state.name + ".log")

    def _paths(self) -> tuple[Path, Path, Path]:
        return (self.backing, self.mountpoint, self.state)

    def cut(self) -> None:
        """The power fails: every write and name change that no sync made durable is lost."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None
        self._unmount()
        self._undo_names()

    def _unmount(self) -> None:
        """Lazily: a process that still has a file open there only gets errors from now on."""
        subprocess.run(["umount", "-l", str(self.mountpoint)], check=True, capture_output=True)

    def _undo_names(self) -> None:
        journal = self.state / "journal"
        lines = journal.read_text().splitlines() if journal.exists() else []
        for record in reversed([json.loads(line) for line in lines if line.strip()]):
            path = self.backing / record["path"].lstrip("/")
            if record["op"] == "new":
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            elif record["op"] == "gone":
                os.rename(record["grave"], path)
            elif record["op"] == "moved":
                target = self.backing / record["to"].lstrip("/")
                os.rename(target, path)
                if record["grave"]:
                    os.rename(record["grave"], target)
        shutil.rmtree(self.state, ignore_errors=True)

    def __enter__(self) -> PowerCut:
        self.mount()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.cut()


if __name__ == "__main__":
    serve(*sys.argv[1:4])
