"""Result files written atomically, and read back.

A reader must never see half a file, and an interrupted writer must never
destroy the previous version: every writer here writes a temporary file in the
same directory, flushes it to disk and renames it over the target
(`os.replace`, atomic on POSIX). Appends to JSON-lines logs are one `write`
of whole lines followed by `fsync`, and the readers ignore a last line cut
short by a crash.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any, Iterable, Mapping

import numpy as np


def _fsync_directory(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:  # e.g. directories cannot be opened on some platforms
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
  """Writes `data` to `path` atomically (temporary file + fsync + rename); returns the path."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _fsync_directory(directory)
  return path


def npz_bytes(**arrays: Any) -> bytes:
  """The bytes of an uncompressed .npz holding `arrays` (names as keys)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def atomic_write_npz(path: str | os.PathLike, **arrays: Any) -> str:
  """Writes `arrays` as an .npz to `path` atomically; returns the path."""
  return atomic_write_bytes(path, npz_bytes(**arrays))


def atomic_write_npy(path: str | os.PathLike, array: Any) -> str:
  """Writes one array as an .npy (no pickled objects) to `path` atomically; returns the path."""
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(array), allow_pickle=False)
  return atomic_write_bytes(path, buffer.getvalue())


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
  """Writes `text` to `path` atomically (UTF-8); returns the path."""
  if not isinstance(text, str):
    raise TypeError(f"atomic_write_text writes str; got {type(text).__name__}.")
  return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, payload: Any, *, indent: int = 2,
                      sort_keys: bool = False) -> str:
  """Writes `payload` as JSON atomically; returns the path."""
  return atomic_write_text(path, json.dumps(payload, indent=indent, sort_keys=sort_keys) + "\n")


def read_json(path: str | os.PathLike) -> Any:
  """Reads a JSON file, naming the file in the error when it is not valid JSON."""
  with open(path) as f:
    text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{os.fspath(path)} is not valid JSON ({e}).") from None


def append_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
  """Appends records as JSON lines in one write, then fsyncs.

  A crash can at worst cut the last line short; `read_jsonl` drops such a line.
  """
  lines = "".join(json.dumps(dict(r)) + "\n" for r in records)
  if not lines:
    return
  os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
  with open(path, "a") as f:
    f.write(lines)
    f.flush()
    os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike, *, repair: bool = False) -> list[dict]:
  """The records of a JSON-lines file in order; [] when it does not exist.

  A last line that is not complete JSON (a writer killed mid-line) is dropped;
  a malformed line elsewhere is an error naming the line.

  Args:
    path: the file.
    repair: also cut such a torn last line off the file, so that the next
      append starts on a line of its own.
  """
  if not os.path.exists(path):
    return []
  with open(path) as f:
    text = f.read()
  lines = text.split("\n")
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number >= len(lines) - 1:  # the last line, cut short by a crash
        break
      raise ValueError(f"{os.fspath(path)}, line {number}: not valid JSON ({e}).") from None
  if repair and text and not text.endswith("\n"):
    keep = text.rfind("\n") + 1
    with open(path, "r+b") as f:
      f.truncate(len(text[:keep].encode()))
  return records


def rewrite_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
  """Replaces a JSON-lines file by `records`, atomically."""
  atomic_write_text(path, "".join(json.dumps(dict(r)) + "\n" for r in records))
