"""Saving into a folder so that a crash at any instant leaves the complete old save or the complete new one.

A save writes beside whatever else the folder holds, as Diffusers does, and only ever replaces or removes the
entries (top-level files and folders) that it writes itself or that the previous save of the same kind wrote. The
folder itself is never replaced, so links, permissions, the working directory and other files stay as they are.

Protocol, for a folder `T` whose save has a *commit file* (`config.json` of a fusion, `model_index.json` of a
pipeline), under an exclusive `flock` of `T`:

1. the new save is written to `T/.scorefusion-saving-*` (a crash here leaves the old save untouched);
2. a journal `T/.scorefusion-journal.json` naming the old and the new entries is written atomically;
3. the old entries move to `T/.scorefusion-old-*`, the commit file first; the new entries move in, the commit file
   last: while `T` lacks its commit file every loader fails loudly instead of reading a mix;
4. the journal is removed, then the two hidden folders.

A crash during 3 is completed (rolled forward) by the next load or save through this package; the next save removes
the leftovers of crashed saves. Loads hold a shared lock, so they wait for a save in progress.
"""

import contextlib
import json
import os
import secrets
import shutil
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

try:
    import fcntl
except ImportError:  # not POSIX: no locking between processes
    fcntl = None

JOURNAL_NAME = ".scorefusion-journal.json"
STAGING_PREFIX = ".scorefusion-saving-"
BACKUP_PREFIX = ".scorefusion-old-"
JOURNAL_TEMP_PREFIX = ".scorefusion-journal-"
LEFTOVER_PREFIXES = (STAGING_PREFIX, BACKUP_PREFIX, JOURNAL_TEMP_PREFIX)


@dataclass(frozen=True)
class SaveKind:
    r"""
    What one kind of save writes at the top of its folder.

    Args:
        description (`str`): for messages, e.g. `"FusedUNet save"`.
        commit_file (`str`): the file that makes a save complete; written last, removed first.
        entries_of (`Callable[[dict], Optional[list[str]]]`): the entries a previous save wrote, read from its parsed
            commit file, or `None` when the file is not a save of this kind.
        keep_existing (`tuple[str]`): entries a save writes only when the folder has none (e.g. a Hub model card).
    """

    description: str
    commit_file: str
    entries_of: Callable[[Dict[str, Any]], Optional[List[str]]]
    keep_existing: Sequence[str] = ()

    def __post_init__(self) -> None:
        KINDS[self.description] = self


KINDS: Dict[str, SaveKind] = {}  # by description: a journal names the kind of its save


def is_entry_name(name: Any) -> bool:
    """A single path component that is neither `.`, `..` nor hidden-by-us: what a save may write at its top."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\x00" not in name and not name.startswith(LEFTOVER_PREFIXES) and name != JOURNAL_NAME)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- locks
_held = threading.local()  # per thread: {real path: [descriptor, exclusive]}


def _flock(descriptor: int, exclusive: bool) -> None:
    with contextlib.suppress(OSError):  # file systems without flock: no locking
        fcntl.flock(descriptor, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)


@contextlib.contextmanager
def folder_lock(folder: str, exclusive: bool) -> Iterator[None]:
    """`flock` on the folder itself (released when the process dies, even by `kill -9`); re-entrant per thread, and
    a shared lock this thread holds is converted to an exclusive one for the `with` block."""
    if fcntl is None:
        yield
        return
    held: Dict[str, List[Any]] = _held.__dict__.setdefault("locks", {})
    key = os.path.realpath(folder)
    if key in held:
        descriptor, was_exclusive = held[key]
        if was_exclusive or not exclusive:
            yield
            return
        _flock(descriptor, True)
        held[key][1] = True
        try:
            yield
        finally:
            _flock(descriptor, False)
            held[key][1] = False
        return
    descriptor = os.open(folder, os.O_RDONLY)
    held[key] = [descriptor, exclusive]
    try:
        _flock(descriptor, exclusive)
        yield
    finally:
        del held[key]
        os.close(descriptor)  # releases the lock


# ----------------------------------------------------------------------------------------------------------- files
def _fsync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _write_journal(folder: str, journal: Dict[str, Any]) -> None:
    handle, temporary = tempfile.mkstemp(prefix=JOURNAL_TEMP_PREFIX, dir=folder)
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        json.dump(journal, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, os.path.join(folder, JOURNAL_NAME))
    _fsync_folder(folder)


def _read_journal(folder: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(folder, JOURNAL_NAME)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            journal = json.load(file)
        names = [journal["commit"], *journal["old"], *journal["new"]]
        kind = KINDS.get(journal["kind"])
        valid = (
            kind is not None
            and journal["commit"] == kind.commit_file
            and journal["staging"].startswith(STAGING_PREFIX)
            and journal["backup"].startswith(BACKUP_PREFIX)
            and all("/" not in journal[key] for key in ("staging", "backup"))
            and all(is_entry_name(name) for name in names)
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise OSError(f"the save journal {path} is unreadable ({error}); remove it by hand after checking {folder}")
    if not valid or not set(journal["old"]) <= _entries_of_old_save(folder, journal, kind):
        raise OSError(
            f"the save journal {path} names entries that its save did not write, or entries outside {folder}; it was "
            "not written by a save of this package: remove it by hand"
        )
    return journal


def _entries_of_old_save(folder: str, journal: Dict[str, Any], kind: SaveKind) -> set:
    """What the save being replaced wrote, from its commit file (in the folder, or already in the backup)."""
    commit = journal["commit"]
    for path in (os.path.join(folder, journal["backup"], commit), os.path.join(folder, commit)):
        if commit in journal["old"] and os.path.isfile(path):
            if path == os.path.join(folder, commit) and not os.path.lexists(
                os.path.join(folder, journal["staging"], commit)
            ):
                continue  # that is already the new save's commit file
            try:
                with open(path, encoding="utf-8") as file:
                    entries = kind.entries_of(json.load(file))
            except (OSError, ValueError, AttributeError):
                entries = None
            return {commit, *(entries or [])}
    return set()


def _move(source: str, destination: str) -> None:
    os.replace(source, destination)


def _roll_forward(folder: str, journal: Dict[str, Any]) -> None:
    """Completes a swap (idempotent): old entries out (commit file first), new entries in (commit file last)."""
    staging, backup = os.path.join(folder, journal["staging"]), os.path.join(folder, journal["backup"])
    commit, old, new = journal["commit"], journal["old"], journal["new"]
    for name in [commit] + [name for name in old if name != commit]:
        if name in new and not os.path.lexists(os.path.join(staging, name)):
            continue  # already replaced by the new entry
        if os.path.lexists(os.path.join(folder, name)):
            os.makedirs(backup, exist_ok=True)
            _move(os.path.join(folder, name), os.path.join(backup, name))
    for name in [name for name in new if name != commit] + [commit]:
        if os.path.lexists(os.path.join(staging, name)):
            if os.path.lexists(os.path.join(folder, name)):  # never overwrite what the old save did not hold
                raise FileExistsError(f"{os.path.join(folder, name)} appeared during the save; nothing was replaced")
            _move(os.path.join(staging, name), os.path.join(folder, name))
    _fsync_folder(folder)
    os.unlink(os.path.join(folder, JOURNAL_NAME))
    _fsync_folder(folder)
    shutil.rmtree(backup, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def _roll_back(folder: str, journal: Dict[str, Any]) -> None:
    """Undoes a swap that failed with an exception (not a crash): the old entries back, the new ones out."""
    staging, backup = os.path.join(folder, journal["staging"]), os.path.join(folder, journal["backup"])
    old = set(journal["old"])
    for name in journal["new"]:
        moved_in = name not in old or os.path.lexists(os.path.join(backup, name))
        if (
            moved_in
            and os.path.lexists(os.path.join(folder, name))
            and not os.path.lexists(os.path.join(staging, name))
        ):
            _move(os.path.join(folder, name), os.path.join(staging, name))
    for name in journal["old"]:
        if os.path.lexists(os.path.join(backup, name)):
            _move(os.path.join(backup, name), os.path.join(folder, name))
    os.unlink(os.path.join(folder, JOURNAL_NAME))
    shutil.rmtree(backup, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def _remove_leftovers(folder: str) -> None:
    """Removes the hidden folders and files of crashed saves (call with the exclusive lock: none is alive)."""
    for name in os.listdir(folder):
        if name.startswith(LEFTOVER_PREFIXES):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)


def _legacy_leftovers(folder: str) -> List[str]:
    """Sibling folders `.NAME.saving-*` / `.NAME.old-*` of saves by diffusers-scorefusion 0.1."""
    parent, name = os.path.split(os.path.abspath(folder))
    if not os.path.isdir(parent):
        return []
    prefixes = (f".{name}.saving-", f".{name}.old-")
    return sorted(os.path.join(parent, entry) for entry in os.listdir(parent) if entry.startswith(prefixes))


def recover_legacy(folder: str, remove: bool = False) -> None:
    """A 0.1 save killed between its two renames left `folder` missing and the old save in `.NAME.old-*/previous`."""
    leftovers = _legacy_leftovers(folder)
    if not os.path.lexists(folder):
        old_prefix = f".{os.path.basename(os.path.abspath(folder))}.old-"
        backups = [
            os.path.join(path, "previous") for path in leftovers if os.path.basename(path).startswith(old_prefix)
        ]
        backups = [path for path in backups if os.path.isdir(path)]
        if backups:
            os.replace(max(backups, key=os.path.getmtime), folder)
    if remove:
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)


def recover(folder: str, remove_leftovers: bool) -> None:
    """Completes an interrupted save of `folder` (call with the exclusive lock) and, if asked, removes leftovers."""
    journal = _read_journal(folder)
    if journal is not None:
        _roll_forward(folder, journal)
    if remove_leftovers or journal is not None:
        _remove_leftovers(folder)


@contextlib.contextmanager
def reading(folder: str) -> Iterator[None]:
    """Holds a shared lock on a local save folder while it is loaded, completing an interrupted save first."""
    if not os.path.lexists(folder):
        recover_legacy(folder, remove=False)
    if not os.path.isdir(folder):
        yield
        return
    with folder_lock(folder, exclusive=False):
        if os.path.lexists(os.path.join(folder, JOURNAL_NAME)):
            try:
                with folder_lock(folder, exclusive=True):
                    recover(folder, remove_leftovers=True)
            except PermissionError as error:
                raise OSError(
                    f"a save of {folder} was interrupted and completing it needs write access: {error}"
                ) from error
        yield


# ----------------------------------------------------------------------------------------------------------- saving
def previous_entries(folder: str, kind: SaveKind) -> List[str]:
    """The entries of the save of `kind` in `folder` (`[]` when it has none); refuses a commit file of another kind."""
    path = os.path.join(folder, kind.commit_file)
    if not os.path.lexists(path):
        return []
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
    except (OSError, ValueError) as error:
        raise FileExistsError(
            f"{path} exists but is not readable JSON ({error}); saving would overwrite it: choose another folder"
        ) from error
    entries = kind.entries_of(content) if isinstance(content, dict) else None
    if entries is None or not all(is_entry_name(name) for name in entries):
        raise FileExistsError(
            f"{path} exists and is not from a {kind.description}; saving would overwrite it: choose another folder, "
            "or remove it if it is yours"
        )
    return [name for name in dict.fromkeys([kind.commit_file, *entries]) if os.path.lexists(os.path.join(folder, name))]


def check_save_target(folder: str, kind: SaveKind, new_entries: Sequence[str] = ()) -> List[str]:
    """Refuses, before anything is written, a target that is a file, holds a commit file of another kind, or holds
    `new_entries` that the previous save did not write. Returns the previous save's entries."""
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"save_directory {folder!r} is not a folder; expected a new, empty or existing folder")
    if not os.path.isdir(folder):
        return []
    old = previous_entries(folder, kind)
    candidates = [name for name in new_entries if name not in old and name not in kind.keep_existing]
    foreign = [name for name in candidates if os.path.lexists(os.path.join(folder, name))]
    if foreign:
        raise FileExistsError(
            f"save_directory {folder!r} already holds {foreign}, which the previous {kind.description} did not write; "
            "saving would replace them: choose another folder, or remove them if they are yours"
        )
    for name in old:  # moving a folder to another parent needs write access to it
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path) and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} (written by the previous save) is read-only, so it cannot be replaced")
    return old


def atomic_save(folder: str, write: Callable[[str], None], kind: SaveKind) -> None:
    r"""
    Runs `write(staging)` and moves what it wrote into `folder` as described in the module docstring.

    `write` must put `kind.commit_file` at the top of the folder it is given. Entries of `folder` that neither this
    save nor the previous save of `kind` wrote are never touched; one of them with the name of a new entry makes the
    save fail before anything is moved.
    """
    folder = os.fspath(folder)
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"save_directory {folder!r} is not a folder; expected a new, empty or existing folder")
    recover_legacy(folder, remove=True)
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    try:
        _save_locked(folder, write, kind)
    except BaseException:
        if created:  # a failed save into a new folder leaves no empty folder behind
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


def _new_folder(parent: str, prefix: str) -> str:
    """A new folder `parent/prefix<random>`, with the permissions `os.makedirs` gives (`mkdtemp` makes it private)."""
    for _ in range(100):
        path = os.path.join(parent, prefix + secrets.token_hex(6))
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a staging folder in {parent}")


def _save_locked(folder: str, write: Callable[[str], None], kind: SaveKind) -> None:
    with folder_lock(folder, exclusive=True):
        recover(folder, remove_leftovers=True)
        check_save_target(folder, kind)
        staging = _new_folder(folder, STAGING_PREFIX)
        try:
            write(staging)
            new = sorted(os.listdir(staging))
            if kind.commit_file not in new:
                raise RuntimeError(f"the save wrote no {kind.commit_file}; nothing was changed in {folder}")
            new = [
                name for name in new if not (name in kind.keep_existing and os.path.lexists(os.path.join(folder, name)))
            ]
            old = check_save_target(folder, kind, new)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        backup = BACKUP_PREFIX + os.path.basename(staging)[len(STAGING_PREFIX) :]
        journal = {"kind": kind.description, "staging": os.path.basename(staging), "backup": backup,
                   "commit": kind.commit_file, "old": old, "new": new}  # fmt: skip
        try:
            _write_journal(folder, journal)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            _roll_forward(folder, journal)
        except Exception:
            _roll_back(folder, journal)
            raise
