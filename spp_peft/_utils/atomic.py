"""The one way spp-peft writes files and folders.

Every file or folder spp-peft writes (adapters, pruned and merged models, reports, logs, caches) goes
through :func:`atomic_write_dir` or :func:`atomic_write_file`:

- the content is written into a temporary sibling ``.<name>.tmp-<pid>-<random>`` (same file system, so
  the final rename is atomic), fsynced, then renamed onto the target: a reader, a crash (kill -9, power
  loss) or a full disk sees the complete old version or the complete new one, never a mix;
- replacing a folder swaps the two in one atomic step where the system can (Linux ``renameat2``), else
  moves the old one aside (``.<name>.old-<pid>-<random>``) first; the old one is deleted only once the new
  one is in place, and a crash between the two renames is repaired by the next write (the old folder is
  moved back);
- a non-empty target is refused (:class:`OutputExistsError`) unless ``overwrite=True``; the check and the
  rename happen under an inter-process lock, so of two writers racing without overwrite exactly one wins
  and the other fails cleanly, its own temporary folder removed;
- leftovers of crashed writers (their pid is gone) are removed by the next write of the same target.

This module imports only the standard library and ``filelock``.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from filelock import FileLock, Timeout

PathLike = Union[str, os.PathLike]
#: ``.<name>.<kind>-<pid>-<random>``: a temporary (``tmp``) or moved-aside (``old``) sibling of ``<name>``.
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")
#: Seconds to wait for another writer of the same target (it holds the lock only for a few renames).
LOCK_TIMEOUT = 120.0
try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - no C library to load (Windows): the portable path is used
    _LIBC = None


class OutputExistsError(FileExistsError):
    """The target of a write is a non-empty folder (or a file) and ``overwrite`` was not given."""

    def __init__(self, path: PathLike):
        super().__init__(f"{path} already exists and is not empty; pass --overwrite (overwrite=True) to replace it")
        self.path = str(path)  # not .filename: OSError would then print "[Errno None] None: path"


class OutputBusyError(FileExistsError):
    """Another process is writing the same target right now."""

    def __init__(self, path: PathLike):
        super().__init__(f"{path} is being written by another process right now; wait for it or choose "
                         "another output folder")
        self.path = str(path)


def check_output(path: Optional[PathLike], overwrite: bool = False) -> Path:
    """``path`` as a ``Path``, after refusing an empty path (it would mean the current folder) and, without
    ``overwrite``, an existing non-empty target. Call it before any expensive work."""
    if path is None or not str(path).strip():
        raise ValueError("the output path is empty; name a folder to write into")
    target = Path(path).expanduser()
    if not overwrite and _occupied(target):
        raise OutputExistsError(target)
    # The folder that will hold it: found unusable now, not after hours of work.
    holder = next((p for p in Path(os.path.abspath(target)).parents if os.path.lexists(p)), None)
    if holder is None:  # the root itself: refused where it would be replaced
        return target
    if not holder.is_dir():
        raise ValueError(f"{holder} is a file, not a folder: cannot write {target}")
    if not os.access(holder, os.W_OK | os.X_OK):
        raise ValueError(f"{holder} is not writable: cannot write {target}")
    return target


def _occupied(path: Path) -> bool:
    if path.is_dir():  # through a symlink too: what counts is the folder it names
        return any(path.iterdir())
    return os.path.lexists(path)


@contextmanager
def atomic_write_dir(target: Optional[PathLike], overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target``; when the block ends without an exception, fsync
    it and rename it to ``target`` (replacing an existing one only with ``overwrite``).

    On any exception (including ``KeyboardInterrupt``) the temporary folder is removed and ``target`` is
    exactly as it was. Raises :class:`OutputExistsError` before the block runs, and again at the rename if
    another writer got there first.
    """
    target = _prepare(target, overwrite)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _publish(tmp, target, overwrite)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_file(path: Optional[PathLike], data: Union[str, bytes, Callable[[Path], object]],
                      overwrite: bool = True) -> Path:
    """Write ``data`` (text as UTF-8, bytes, or a callable that writes the file at the path it is given) to
    a temporary sibling, fsync it and rename it onto ``path``. Files are replaced by default (reports and
    logs are rewritten as a run goes); ``overwrite=False`` refuses an existing file."""
    target = _prepare(path, overwrite)
    tmp = _sibling(target, "tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as handle:
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        _fsync_tree(tmp)
        _publish(tmp, target, overwrite)
    except BaseException:
        _remove(tmp)
        raise
    return target


def _prepare(path: Optional[PathLike], overwrite: bool) -> Path:
    """Check the target, create its parent, and clean what crashed writers left (frees the space first)."""
    target = check_output(path, overwrite=True)
    # A symlinked target is written where it points; "." or "a/.." get their real name (the sibling's).
    target = Path(os.path.abspath(target.resolve() if target.is_symlink() else target))
    if not target.name or Path.cwd().is_relative_to(target):
        raise ValueError(f"{target} holds the current folder; it cannot be replaced as a whole")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target):
        clean_stale(target)
        if not overwrite and _occupied(target):
            raise OutputExistsError(target)
    return target


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename ``tmp`` onto ``target``; the check and the renames happen under the target's lock."""
    old = None
    with _lock(target):
        clean_stale(target)
        if not overwrite and _occupied(target):
            raise OutputExistsError(target)
        both_dirs = tmp.is_dir() and target.is_dir() and not target.is_symlink()
        if not os.path.lexists(target) or not (tmp.is_dir() or target.is_dir()):
            os.replace(tmp, target)  # atomic for files, and for a folder onto nothing
        elif both_dirs and _exchange(tmp, target):
            old = tmp  # the swap left the old folder under the temporary name
        else:
            # A folder cannot be renamed over a non-empty one (nor over a file): move it aside, delete it once
            # the new one is in.
            old = _sibling(target, "old")
            os.rename(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
        _fsync_dir(target.parent)
    if old is not None:
        _remove(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``), so that readers never find
    the target missing; False where the system or file system cannot, and the caller moves aside instead."""
    rename = getattr(_LIBC, "renameat2", None)
    if rename is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if rename(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def can_exchange() -> bool:
    """Whether folder replacement is a single atomic swap here (else: two renames, repaired after a crash)."""
    return getattr(_LIBC, "renameat2", None) is not None


def clean_stale(target: PathLike) -> list[Path]:
    """Remove the temporary siblings of ``target`` left by writers that no longer run (kill -9, power loss);
    a moved-aside old folder whose replacement never arrived is moved back. Returns what was removed."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        match = _SIBLING.match(entry.name)
        if not match or match["name"] != target.name or _alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not os.path.lexists(target):
            os.rename(entry, target)  # the crash came between the two renames of _publish: undo the first
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextmanager
def exclusive(folder: PathLike) -> Iterator[Path]:
    """Hold ``folder`` for a whole job (a run, a training) that writes many things into it: a second job on
    the same folder fails at once with :class:`OutputBusyError` instead of mixing its files in."""
    folder = Path(folder).expanduser()
    with _lock(folder, "job", timeout=0):
        yield folder


@contextmanager
def _lock(target: Path, purpose: str = "write", timeout: float = LOCK_TIMEOUT):
    """An inter-process lock per target and purpose (a job may write into its own folder). The lock files
    live in the temp folder, not beside the target, so that the user's folders hold only their outputs."""
    folder = Path(tempfile.gettempdir()) / f"spp-peft-locks-{getattr(os, 'getuid', lambda: 0)()}"
    folder.mkdir(exist_ok=True)
    key = hashlib.sha256(f"{purpose}:{target.absolute()}".encode()).hexdigest()[:24]
    lock = FileLock(str(folder / f"{key}.lock"), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise OutputBusyError(target) from None
    try:
        yield
    finally:
        lock.release()


def _fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and every folder (so the names are durable too)."""
    if not path.is_dir():
        _fsync_file(path)
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            _fsync_file(Path(root) / name)
        _fsync_dir(Path(root))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open a folder (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a file or a folder tree, quietly (cleanup must never hide the error being handled)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            path.unlink()
    except OSError:
        pass
