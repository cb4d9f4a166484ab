"""Where a run may read and write: path confinement, safe reading, output file-name templates.

Every rule a file name from a model, a pipeline file or the command line must pass lives here, so
that the checks are the same everywhere:

* external data (``location`` in a model) resolves inside the model's folder: a relative path, no
  ``..``, no symlink leading out, a regular file (no device, FIFO or ``/proc`` file);
* reads are exact: a file shorter than what a tensor claims is an error naming the tensor;
* files named as data or models are regular files (a FIFO would block, a device never ends);
* output file names come from one template function that substitutes ``{model}`` only and must
  yield a bare file name (no folder, no ``..``) inside the output folder;
* no file a run reads can be a file it writes (compared by resolved path).
"""
from __future__ import annotations

import errno
import os
import stat
import string
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO, Callable, Iterable

from .errors import AmctError, ConfigError, ModelLoadError, Problem

__all__ = [
    "TEMPLATE_FIELDS", "MAX_NAME_BYTES", "OutputError", "file_kind", "open_regular", "require_regular",
    "read_exact", "external_data_path", "template_problem", "render_filename", "check_file_name",
    "entry_path", "input_keys", "is_within", "relative_folder",
]

TEMPLATE_FIELDS = ("model",)          # the fields file-name templates may use: {model} = input stem
MAX_NAME_BYTES = 255                  # longest file name most file systems take
STAGING_PREFIX = ".amct-staging-"     # hidden folder a run stages its outputs in


class OutputError(AmctError):
    """An output could not be written (folder is a file, disk full, ...); names the file or option."""


# -- kinds of files ----------------------------------------------------------------------------------
def file_kind(mode: int) -> str:
    """'regular file', 'directory', 'FIFO', 'character device', ... for an ``st_mode``."""
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symlink")):
        if test(mode):
            return name
    return "special file"


def require_regular(path: str | os.PathLike, what: str, error: Callable[[str], Exception] = ModelLoadError,
                    missing: str = "does not exist") -> os.stat_result:
    """``stat`` a path that must be a regular file; the error says what it is instead."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what}: {path} {missing}") from None
    except OSError as exc:
        raise error(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what}: {path} is a {file_kind(info.st_mode)}, not a regular file")
    return info


def open_regular(path: str | os.PathLike, what: str, error: Callable[[str], Exception] = ModelLoadError,
                 missing: str = "does not exist") -> BinaryIO:
    """Open a regular file for reading; FIFOs and devices are refused without blocking on them."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{what}: {path} {missing}") from None
    except OSError as exc:
        raise error(f"{what}: cannot open {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what}: {path} is a {file_kind(info.st_mode)}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_exact(handle: BinaryIO, offset: int, length: int, what: str,
               error: Callable[[str], Exception] = ModelLoadError) -> bytes:
    """Exactly ``length`` bytes at ``offset``; a short file is an error naming ``what``."""
    handle.seek(offset)
    data = handle.read(length)
    if len(data) != length:
        raise error(f"{what}: the file holds {len(data)} of the {length} bytes at offset {offset}; "
                    "it is truncated (an incomplete download?)")
    return data


# -- external data ----------------------------------------------------------------------------------
def external_data_path(base_dir: str | os.PathLike, location: str, where: str) -> Path:
    """The checked file behind an external-data ``location``: inside ``base_dir``, a regular file.

    ``where`` names the model and tensor (``m.onnx: initializer 'w'``); every refusal is one
    line starting with it and naming the location.
    """
    def refuse(reason: str, hint: str = "keep external data files in the model's folder") -> ModelLoadError:
        return ModelLoadError(f"{where}: external data location {location!r} {reason}; {hint}")

    if not location:
        raise refuse("is empty", "the tensor must name its data file")
    if "\x00" in location:
        raise refuse("contains a NUL byte")
    parts = PurePosixPath(location.replace("\\", "/")).parts
    if location.startswith(("/", "\\")) or PureWindowsPath(location).drive or os.path.isabs(location):
        raise refuse("is an absolute path", "it must be relative to the model's folder")
    if ".." in parts:
        raise refuse("uses '..' to leave the model's folder")
    base = os.path.realpath(base_dir)
    full = os.path.realpath(os.path.join(base, location))
    if not is_within(full, base):
        raise refuse(f"resolves to {full}, outside the model's folder {base} (through a symlink)")
    try:
        info = os.stat(full)
    except FileNotFoundError:
        raise refuse("is missing", "put the data file beside the model") from None
    except OSError as exc:
        raise refuse(f"cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise refuse(f"is a {file_kind(info.st_mode)}, not a regular file")
    return Path(full)


# -- output file names --------------------------------------------------------------------------------
def template_problem(template: str) -> str | None:
    """Why ``template`` is not an acceptable file-name template, or None.

    Only ``{model}`` (see TEMPLATE_FIELDS) is substituted; ``{{`` and ``}}`` are literal braces.
    Format specs (``{model:>9}``), conversions (``{model!r}``), positional fields (``{0}``, ``{}``),
    attribute or index access (``{model.x}``, ``{model[0]}``) and unknown names are refused, so a
    template can neither allocate nor reach anything.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"{exc} (write a literal brace as {{{{ or }}}})"
    fields = ", ".join("{%s}" % f for f in TEMPLATE_FIELDS)
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        shown = "{" + field + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}"
        if len(shown) > 60:
            shown = shown[:57] + "...}"
        if field not in TEMPLATE_FIELDS:
            return f"{shown} is not a template field; only {fields} is (a literal brace is {{{{ or }}}})"
        if spec or conversion:
            return f"{shown} has a format spec or conversion; write {fields} alone"
    return None


def render_filename(template: str, option: str, *, model: str, source: str = "<pipeline>",
                    fragment: bool = False) -> str:
    """Substitute ``{model}`` in a file-name template and check the result is a safe file name.

    ``option`` names the option in errors (``passes[3].options.filename``). The result must be a
    bare file name (no folder part, no '..'); with ``fragment`` it is part of one (``lower``'s
    prefix) and may be empty.
    """
    problem = template_problem(template)
    if problem:
        raise ConfigError([Problem(source, option, f"file-name template {_short(template)}: {problem}")])
    fields = {"model": model}
    name = "".join(literal + (fields[field] if field is not None else "")
                   for literal, field, _, _ in string.Formatter().parse(template))
    if fragment:
        if name:
            check_file_name(name, option, source=source)
    else:
        check_file_name(name, option, source=source)
    return name


def check_file_name(name: str, option: str, *, source: str = "<pipeline>", bare: bool = True) -> None:
    """A name an output may take inside the output folder: relative, no '..', bare by default."""
    def refuse(reason: str, hint: str = "give a plain file name; files are written into the output folder"):
        return ConfigError([Problem(source, option, f"file name {_short(name)} {reason}", hint)])
    if not name or name.strip() != name or name in (".", ".."):
        raise refuse("is empty, '.' or '..', or starts or ends with a space")
    if any(ord(c) < 32 for c in name):
        raise refuse("contains a control character")
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive or os.path.isabs(name):
        raise refuse("is an absolute path")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        raise refuse("uses '..'")
    if bare and (len(parts) != 1 or "/" in name or "\\" in name):
        raise refuse("has a folder part")
    if any(len(p.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for p in parts):
        raise refuse(f"is longer than {MAX_NAME_BYTES} bytes")
    if parts[-1].startswith(STAGING_PREFIX):
        raise refuse("is reserved for staging folders")


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")


def relative_folder(base: str | os.PathLike, name: str, option: str) -> Path:
    """A folder given relative to ``base`` (e.g. ``--dump-ir ir``), which must stay inside it."""
    check_file_name(name.rstrip("/") or name, option, source="command line", bare=False)
    return Path(base) / name.rstrip("/")


# -- identity of files ---------------------------------------------------------------------------------
def entry_path(path: str | os.PathLike) -> str:
    """The directory entry a path names, with its folder resolved (the name itself may be a symlink)."""
    path = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def input_keys(path: str | os.PathLike) -> set[str]:
    """What writing must never replace for an input: its directory entry and the file it resolves to."""
    return {entry_path(path), os.path.realpath(path)}


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether a resolved ``path`` lies inside the resolved ``folder`` (or is it)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:
        return False


def files_under(path: str | os.PathLike) -> Iterable[Path]:
    """A file, or the files directly inside a folder (what a data reader may read)."""
    path = Path(path)
    if path.is_dir():
        return [p for p in path.iterdir() if p.is_file()]
    return [path]


def describe_os_error(exc: OSError) -> str:
    """'No space left on device' and friends, without the Python exception name."""
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    return exc.strerror or str(exc)
