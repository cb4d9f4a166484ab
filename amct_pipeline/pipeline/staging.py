"""The output stage: files a run writes, staged in a hidden folder and renamed into place at the end.

* Every file goes to ``<output-dir>/.amct-staging-<host>-<pid>-<start>-<random>/`` first and is
  renamed into the output folder only when the whole pipeline succeeded; each rename is atomic,
  so no visible file is ever partial.
* The staging folder's name says which process owns it. A later run removes the staging folders
  of processes that are gone (a killed run), never one of a live process or of another host.
* A failed run removes the staging folder and the (empty) output folders it created.
* Before any work, ``prepare`` checks the output folder (not a file, writable) and ``check_names``
  checks every planned name: a bare file name that is not one of the run's inputs.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterable

from ..errors import ConfigError, Problem
from ..files import (STAGING_PREFIX, OutputError, check_file_name, describe_os_error, entry_path, file_kind,
                    input_keys, is_within)

__all__ = ["OutputStage", "remove_stale_staging", "staging_owner", "LEGACY_STALE_SECONDS"]

LEGACY_STALE_SECONDS = 24 * 3600     # staging folders without an owner in their name: removed after a day
_NAME = re.compile(re.escape(STAGING_PREFIX) + r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _start_ticks(pid: int) -> int:
    """The process's start time in clock ticks since boot (Linux); 0 where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def staging_owner(name: str) -> tuple[str, int, int] | None:
    """(host tag, pid, start ticks) encoded in a staging folder's name; None for other names."""
    match = _NAME.match(name)
    return (match["host"], int(match["pid"]), int(match["start"])) if match else None


def _is_stale(entry: os.DirEntry) -> bool:
    owner = staging_owner(entry.name)
    if owner is None:                          # an older version's folder: only when clearly abandoned
        try:
            return time.time() - entry.stat(follow_symlinks=False).st_mtime > LEGACY_STALE_SECONDS
        except OSError:
            return False
    host, pid, start = owner
    if host != _host_tag():                    # another machine's run on a shared folder: cannot tell
        return False
    if pid == os.getpid() and start == _start_ticks(pid):
        return False
    if not _alive(pid):
        return True
    return start != 0 and _start_ticks(pid) not in (0, start)     # the pid was reused by another process


def remove_stale_staging(directory: str | os.PathLike) -> list[str]:
    """Remove the staging folders of runs that are gone (killed); returns their names."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(STAGING_PREFIX):
            continue
        try:
            is_dir = stat.S_ISDIR(entry.stat(follow_symlinks=False).st_mode)
        except OSError:
            continue
        if is_dir and _is_stale(entry):
            shutil.rmtree(entry.path, ignore_errors=True)
            if not os.path.lexists(entry.path):
                removed.append(entry.name)
    return removed


class OutputStage:
    """Files passes write go to a hidden staging folder; they appear only when the run succeeds."""

    def __init__(self, directory: str | Path | None, *, option: str = "--output-dir") -> None:
        self.directory = Path(directory) if directory is not None else None
        self.option = option
        self._staging: Path | None = None
        self._created: list[Path] = []            # folders this run made, outermost first
        self.files: list[str] = []
        self.protected: set[str] = set()          # input_keys of every file the run reads
        self.removed_stale: list[str] = []

    # -- inputs ----------------------------------------------------------------------------------
    def protect(self, path: str | Path) -> None:
        """Never write over this file (the input model, its data, the pipeline file, data files...)."""
        self.protected |= input_keys(path)

    def protects(self, path: str | Path) -> bool:
        return entry_path(path) in self.protected or os.path.realpath(path) in self.protected

    # -- checks before any work -------------------------------------------------------------------
    def prepare(self) -> None:
        """Check the output folder can be used and clear stale staging folders; nothing is created."""
        if self.directory is None:
            return
        probe = self.directory
        while True:
            try:
                info = os.stat(probe)
            except (FileNotFoundError, NotADirectoryError):
                if probe.parent == probe:
                    break
                probe = probe.parent
                continue
            except OSError as exc:
                raise OutputError(f"{self.option} {self.directory}: cannot use {probe} ({describe_os_error(exc)})") \
                    from None
            if not stat.S_ISDIR(info.st_mode):
                what = "is" if probe == self.directory else f"is inside {probe}, which is"
                raise OutputError(f"{self.option} {self.directory} {what} a {file_kind(info.st_mode)}, "
                                  "not a folder; choose another output folder")
            if not os.access(probe, os.W_OK | os.X_OK):
                raise OutputError(f"{self.option} {self.directory}: {probe} is not writable")
            break
        if self.directory.is_dir():
            self.removed_stale = remove_stale_staging(self.directory)

    def check_names(self, names: Iterable[tuple[str, str]], source: str = "<pipeline>") -> None:
        """Each (option, file name) a run plans to write: a bare name, not an input, not a folder."""
        problems = []
        for option, name in names:
            try:
                check_file_name(name, option, source=source)
            except ConfigError as exc:
                problems += exc.problems
                continue
            if self.directory is None:
                continue
            target = self.directory / name
            if self.protects(target):
                problems.append(Problem(source, option, f"writing {name!r} into {self.directory} would overwrite "
                                        "an input file of this run", "choose another output folder or file name"))
            elif target.is_dir() and not target.is_symlink():
                problems.append(Problem(source, option, f"{target} is a folder; the output {name!r} cannot "
                                        "replace it", "choose another output folder or file name"))
        if problems:
            raise ConfigError(problems)

    # -- writing ---------------------------------------------------------------------------------
    def path(self, filename: str) -> Path:
        """Where a pass writes ``filename`` now (inside the staging folder)."""
        if self.directory is None:
            raise ConfigError(f"this pipeline writes '{filename}'; give an output directory (--output-dir)")
        check_file_name(filename, "output file", source=str(self.directory))
        if self.protects(self.directory / filename):
            raise ConfigError(f"writing '{filename}' into {self.directory} would overwrite an input file; "
                              "choose another output directory or file name")
        if self._staging is None:
            self._make_staging()
        if filename not in self.files:
            self.files.append(filename)
        return self._staging / filename

    def write_error(self, exc: BaseException) -> OutputError | None:
        """A pass's failed write into the staging folder, told as the output file it was writing."""
        filename = getattr(exc, "filename", None)
        if not isinstance(exc, OSError) or self._staging is None or not filename:
            return None
        staged = Path(os.fsdecode(filename))
        if not is_within(staged, self._staging):
            return None
        name = staged.relative_to(self._staging).as_posix() if staged.is_absolute() else staged.name
        return OutputError(f"{self.option} {self.directory}: cannot write {name} ({describe_os_error(exc)})")

    def _make_staging(self) -> None:
        missing = []
        probe = self.directory
        while not probe.exists() and probe.parent != probe:
            missing.append(probe)
            probe = probe.parent
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._created = [p for p in reversed(missing) if p.is_dir()]
            prefix = f"{STAGING_PREFIX}{_host_tag()}-{os.getpid()}-{_start_ticks(os.getpid())}-"
            self._staging = Path(tempfile.mkdtemp(prefix=prefix, dir=self.directory))
        except OSError as exc:
            self._remove_created()
            raise OutputError(f"{self.option} {self.directory}: cannot create the output folder "
                              f"({describe_os_error(exc)})") from None

    def commit(self) -> list[Path]:
        """Rename every staged file into the output folder (each rename atomic)."""
        if self._staging is None:
            return []
        written = []
        for filename in self.files:
            staged = self._staging / filename
            if staged.exists():
                final = self.directory / filename
                try:
                    staged.replace(final)
                except OSError as exc:
                    raise OutputError(f"{self.option} {self.directory}: cannot write {filename} "
                                      f"({describe_os_error(exc)})") from None
                written.append(final)
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging = None
        self._created = []
        return written

    def abort(self) -> None:
        """Drop the staged files and the empty output folders this run created."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()          # only when empty: never remove what someone else put there
            except OSError:
                break
        self._created = []
