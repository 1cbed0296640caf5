"""The user's files: one check for "can I write here" and one for "read this text file", used by every verb.

Both run before any long work starts, so a bad path or a file in the wrong encoding fails in one line (DreamError)
instead of a traceback after minutes of work, and nothing is written or overwritten.
"""

from __future__ import annotations

import codecs
import errno
import json
import os
import tempfile
from pathlib import Path

from dreamlm.errors import DreamError

CHUNK = 1 << 20  # text files are checked in pieces of this many bytes (a large corpus is never held whole)
BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
        (codecs.BOM_UTF16_BE, "UTF-16"))


def as_path(path: object, what: str = "path") -> Path:
    """`path` as a Path; DreamError for None, numbers and other things that are not a path."""
    if isinstance(path, Path):
        return path
    if isinstance(path, str) and path.strip() and "\0" not in path:
        return Path(path)
    if isinstance(path, str):
        raise DreamError(f"the {what} is empty" if not path.strip() else f"the {what} holds a NUL character")
    raise DreamError(f"the {what} must be a path (str or pathlib.Path), got {type(path).__name__} {path!r}")


def _decode_error(path: Path, head: bytes, exc: UnicodeDecodeError | None, offset: int) -> DreamError:
    for bom, name in BOMS:
        if head.startswith(bom):
            return DreamError(f"{path} is {name} text; save it as UTF-8")
    if exc is None:
        return DreamError(f"{path} is not UTF-8 text: it holds NUL bytes (a binary file, or UTF-16 without a "
                          "byte-order mark)")
    where = offset + exc.start
    return DreamError(f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {where}; Latin-1 or "
                      "another legacy encoding?); save it as UTF-8")


def _open(path: Path, what: str):
    if not path.exists():
        raise DreamError(f"{what} {path} does not exist")
    if path.is_dir():
        raise DreamError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise DreamError(f"{what} {path} is not a regular file")
    try:
        return path.open("rb")
    except OSError as exc:
        raise DreamError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def text_file(path: str | Path, what: str = "file") -> Path:
    """Check that `path` is a readable UTF-8 text file (a UTF-8 BOM allowed; UTF-16, Latin-1, binary refused),
    reading it in pieces; returns it as a Path."""
    path = as_path(path, what)
    with _open(path, what) as fh:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset, head = 0, b""
        try:
            while True:
                chunk = fh.read(CHUNK)
                if not head:
                    head = chunk[:4096]
                if b"\0" in chunk:  # valid UTF-8 but never text: an image, an archive, a checkpoint
                    raise _decode_error(path, head, None, offset)
                decoder.decode(chunk, final=not chunk)
                if not chunk:
                    break
                offset += len(chunk)
        except UnicodeDecodeError as exc:
            raise _decode_error(path, head, exc, offset) from None
        except OSError as exc:
            raise DreamError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    return path


def read_text(path: str | Path, what: str = "file") -> str:
    """The text of a small UTF-8 file (recipes, configs, puzzle lists), BOM dropped; DreamError saying what is
    wrong with it otherwise (missing, a folder, binary, UTF-16, Latin-1, unreadable)."""
    path = as_path(path, what)
    with _open(path, what) as fh:
        try:
            data = fh.read()
        except OSError as exc:
            raise DreamError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if b"\0" in data:
        raise _decode_error(path, data[:4096], None, 0)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _decode_error(path, data[:4096], exc, 0) from None


def output_file(path: str | Path) -> Path:
    """Check a file to be written before any work starts: not a folder, no file where a folder must be, a folder
    that accepts new files (tried, not guessed from permission bits: root passes those everywhere, even in /proc).
    Missing folders are created only when the file is written."""
    path = as_path(path, "output path")
    if path.is_dir():
        raise DreamError(f"{path} is a folder; give a file name to write")
    if path.exists() and not path.is_file():
        raise DreamError(f"{path} is not a regular file; give a file name to write")
    return _writable_parent(path)


def output_dir(path: str | Path, empty: bool = False) -> Path:
    """Check a folder to be written into before any work starts (and, with `empty`, that it holds nothing)."""
    path = as_path(path, "output folder")
    if path.exists() and not path.is_dir():
        raise DreamError(f"{path} is a file, not a folder")
    if empty and path.is_dir() and any(path.iterdir()):
        raise DreamError(f"{path} is not empty; give a new or empty folder (nothing is overwritten)")
    if path.is_dir():
        _probe(path, path)
        return path
    return _writable_parent(path)


def _writable_parent(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DreamError(f"cannot write {path}: {parent} is a file, not a folder")
            _probe(path, parent)
            break
    return path


def _probe(path: Path, folder: Path) -> None:
    """Create and remove an empty file in `folder` (the only test that holds for root, /proc, read-only mounts)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".dreamlm-probe-", dir=folder)
    except OSError as exc:
        why = f" ({exc.strerror})" if exc.strerror and exc.errno != errno.ENOENT else ""
        raise DreamError(f"cannot write {path}: {folder} does not accept new files{why}") from None
    os.close(fd)
    os.unlink(name)


def read_puzzle_records(path: str | Path, what: str = "puzzle file") -> list[dict]:
    """The JSON objects of a JSONL puzzle file (UTF-8, a BOM allowed, blank lines skipped), each with a string
    "input"; DreamError naming the first bad line."""
    records = []
    for number, line in enumerate(read_text(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DreamError(f"{path}:{number}: not JSON; every line must be an object with an \"input\"") from None
        if not isinstance(record, dict) or not isinstance(record.get("input"), str):
            raise DreamError(f"{path}:{number}: every line must be an object whose \"input\" is a string")
        records.append(record)
    return records
