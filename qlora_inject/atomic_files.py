"""Files and folders that change as one unit: the old content or the new, never a mix.

`replace_folder(final, write)` lets `write` fill a fresh staging folder beside `final`
(`.NAME.<pid>-<hex>.tmp`), fsyncs it, and swaps it in:

- on Linux, in one step (`renameat2(RENAME_EXCHANGE)`): at every instant `final` is the old folder or
  the new one, for any reader;
- elsewhere (or on a filesystem without that call), by two renames: `final` aside to
  `.NAME.<pid>-<hex>.old`, the staging folder into place. A kill between the two leaves `final`
  missing and the old folder aside; `recover_folder` (run by every save and every adapter load) puts
  it back, so the next reader gets the old folder whole.

Entries of `final` that the writer does not own (a README, tokenizer files, other adapters'
sub-folders) are carried into the staging folder as hard links (copies where a link is refused), so
swapping never loses them. Where a folder cannot be swapped (a mount point, the working directory or
one above it, a parent that is not writable), the new entries are renamed into it one by one, config
last, and only each file is atomic.

Temporary names carry the writing process's id; a later save into the same place removes those whose
process is gone (and the names earlier versions left, `.adapter_model.safetensors.XXXXXXXX.tmp`).
Files and folders get the user's umask, as any other file they write (mode of a replaced file kept).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable, Collection
from pathlib import Path

# Written last when a folder is filled in place: the file that marks a folder as an adapter.
_COMMIT_LAST = "adapter_config.json"
_TEMP_INSIDE = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.tmp$")             # atomic_write_bytes', _fill_in_place's
_LEGACY_TEMP = re.compile(r"^\.(adapter_model\.safetensors|adapter_config\.json)\.[a-z0-9_]{8}\.tmp$")


def _tag() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _owner_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True                                                          # another thread of ours may be saving
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                                                          # EPERM: alive, someone else's
        return True
    return True


def _temp_pattern(name: str, kinds: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.(\d+)-[0-9a-f]{{8}}\.({kinds})$")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:                                                   # some filesystems refuse fsync on folders
        if err.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Create `path` (it must not exist) holding `data`, fsynced; mode 0o666 less the umask, or `mode`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file beside it and an atomic rename.

    A replaced file keeps its mode; a new one gets the umask's. Stale temporary files of `path` left
    by killed processes are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_files(path.parent, path.name)
    mode = path.stat().st_mode & 0o7777 if path.is_file() else None
    tmp = path.parent / f".{path.name}.{_tag()}.tmp"
    try:
        write_file(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def remove_stale_files(folder: Path, name: str) -> None:
    """Remove `folder/.NAME.<pid>-<hex>.tmp` files whose writer is gone, and earlier versions' temp files."""
    pattern = _temp_pattern(name, "tmp")
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.listdir(folder):
            match = pattern.match(entry)
            if (match and not _owner_alive(int(match[1]))) or _LEGACY_TEMP.match(entry):
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    (folder / entry).unlink()


def recover_folder(final: str | os.PathLike) -> None:
    """Finish what a killed `replace_folder` left: put an aside copy back if `final` is missing,
    and remove staging/aside folders (and temp files inside `final`) whose process is gone."""
    final = _real(Path(final))
    parent, name = final.parent, final.name
    leftovers = _temp_pattern(name, "tmp|old")
    try:
        entries = sorted(os.listdir(parent))
    except (FileNotFoundError, NotADirectoryError):
        return
    dead = [e for e in entries if (m := leftovers.match(e)) and not _owner_alive(int(m[1]))]
    if not final.exists():
        asides = [e for e in dead if e.endswith(".old")]
        if asides:                                                           # killed between the two renames
            os.rename(parent / asides[-1], final)
            _fsync_path(parent)
            dead.remove(asides[-1])
    for entry in dead:
        shutil.rmtree(parent / entry, ignore_errors=True)
    if final.is_dir():
        for entry in filter(_is_debris, os.listdir(final)):
            target = final / entry
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)


def replace_folder(final: str | os.PathLike, write: Callable[[Path], None],
                   owned: Collection[str] | None = None) -> Path:
    """Make `final` hold what `write(staging)` writes into an empty folder, as one unit.

    Args:
        final: The folder to create or replace.
        write: Fills the empty folder it is given (its files should be written with `write_file`).
        owned: Names in `final` that the new content replaces; other entries already in `final` are
            carried over. None: the folder is wholly the writer's, nothing is carried over.

    Returns:
        `final`.
    """
    final = _real(Path(final))
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(f"{str(final)!r} is a file; give a folder to save into")
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(final)
    if final.exists() and _cannot_swap(final):
        _fill_in_place(final, write, owned)
        return final
    tag = _tag()
    staging, aside = final.parent / f".{final.name}.{tag}.tmp", final.parent / f".{final.name}.{tag}.old"
    try:
        os.mkdir(staging)
    except OSError as err:
        if not final.exists() or err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        _fill_in_place(final, write, owned)                                  # parent not writable, folder is
        return final
    try:
        write(staging)
        if final.exists():
            shutil.copymode(final, staging)
            if owned is not None:
                _carry_over(final, staging, owned)
        _fsync_tree(staging)
        swapped = _swap(staging, final, aside)
    except BaseException:
        if aside.exists() and not final.exists():
            os.rename(aside, final)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not swapped:                                                          # a bind mount the kernel will not move
        _fill_in_place(final, write, owned)
    return final


def _swap(staging: Path, final: Path, aside: Path) -> bool:
    """Put the complete `staging` folder in `final`'s place; False (nothing changed) where `final` cannot move."""
    try:
        if not final.exists():
            os.rename(staging, final)
        elif _exchange(staging, final):                                      # staging now holds the old folder
            shutil.rmtree(staging, ignore_errors=True)
        else:
            os.rename(final, aside)
            os.rename(staging, final)
            shutil.rmtree(aside, ignore_errors=True)
    except OSError as err:
        if err.errno not in (errno.EBUSY, errno.EXDEV) or aside.exists() or not final.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
        return False
    _fsync_path(final.parent)
    return True


def _is_debris(entry: str) -> bool:
    """A temporary file or folder inside a saved folder whose writer is gone (or an earlier version's)."""
    match = _TEMP_INSIDE.match(entry)
    return bool(match and not _owner_alive(int(match[1]))) or bool(_LEGACY_TEMP.match(entry))


def _real(path: Path) -> Path:
    """The path with symlinks resolved (a symlinked folder is replaced at its target, the link kept)."""
    return Path(os.path.realpath(path))


def _cannot_swap(final: Path) -> bool:
    try:
        cwd = Path.cwd().resolve()
    except OSError:                                                          # the working directory was removed
        return os.path.ismount(final)
    return os.path.ismount(final) or cwd == final or final in cwd.parents


def _carry_over(final: Path, staging: Path, owned: Collection[str]) -> None:
    own = set(owned) | set(os.listdir(staging))
    for entry in os.listdir(final):
        if entry in own or _is_debris(entry):
            continue
        source, target = final / entry, staging / entry
        if source.is_dir() and not source.is_symlink():
            shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
        elif source.is_symlink():
            os.symlink(os.readlink(source), target)
        else:
            _link_or_copy(source, target)


def _link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync_path(Path(root) / name)
        _fsync_path(Path(root))


def _fill_in_place(final: Path, write: Callable[[Path], None], owned: Collection[str] | None) -> None:
    """The fallback where `final` cannot be swapped: stage inside it, then rename entry by entry (config last)."""
    staging = final / f".qlora-inject-staging.{_tag()}.tmp"
    os.mkdir(staging)
    try:
        write(staging)
        _fsync_tree(staging)
        names = sorted(os.listdir(staging), key=lambda n: (n == _COMMIT_LAST, n))
        if owned is None:                                                    # the folder is wholly ours
            for entry in set(os.listdir(final)) - set(names) - {staging.name}:
                target = final / entry
                shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        for entry in names:
            target = final / entry
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(staging / entry, target)
        _fsync_path(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where that is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


__all__ = ["atomic_write_bytes", "recover_folder", "remove_stale_files", "replace_folder", "write_file"]
