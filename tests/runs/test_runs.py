"""certjax.runs: atomic files, resumable JSON lines, checkpoint steps, progress, log filter."""

import ctypes
import logging as py_logging
import os

import numpy as np
import pytest

from certjax import runs
from certjax.runs import environment
from certjax.runs import files


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
  path = tmp_path / "sub" / "a.json"
  files.atomic_write_json(path, {"x": 1})
  files.atomic_write_json(path, {"x": 2, "y": [1, 2]})
  assert files.read_json(path) == {"x": 2, "y": [1, 2]}
  assert os.listdir(tmp_path / "sub") == ["a.json"]

  # A writer that fails half-way keeps the previous version and no temporary.
  with pytest.raises(TypeError):
    files.atomic_write_text(path, object())  # type: ignore[arg-type]
  assert files.read_json(path) == {"x": 2, "y": [1, 2]}
  assert os.listdir(tmp_path / "sub") == ["a.json"]
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="bad.json is not valid JSON"):
    files.read_json(tmp_path / "bad.json")


def test_jsonl_drops_only_a_torn_last_line(tmp_path):
  path = tmp_path / "log.jsonl"
  files.append_jsonl(path, [{"a": 1}, {"a": 2}])
  with open(path, "a") as f:
    f.write('{"a": 3, "b"')  # killed mid-line
  assert files.read_jsonl(path) == [{"a": 1}, {"a": 2}]
  # Repaired, the next append starts on a line of its own.
  assert files.read_jsonl(path, repair=True) == [{"a": 1}, {"a": 2}]
  files.append_jsonl(path, [{"a": 4}])
  assert files.read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 4}]
  path.write_text('{"a": 1}\n{broken\n{"a": 3}\n')
  with pytest.raises(ValueError, match="line 2: not valid JSON"):
    files.read_jsonl(path)
  assert files.read_jsonl(tmp_path / "missing.jsonl") == []


def test_checkpoint_steps_and_resolve_step(tmp_path):
  workdir = tmp_path / "w"
  with pytest.raises(FileNotFoundError, match="No checkpoint.*launch.train"):
    runs.resolve_step(str(workdir))
  for name in ("20", "100", "40", "60.orbax-checkpoint-tmp-3"):
    os.makedirs(workdir / "checkpoints" / name)
  assert runs.checkpoint_steps(str(workdir)) == [20, 40, 100]
  assert runs.resolve_step(str(workdir)) == 100
  assert runs.resolve_step(str(workdir), -1) == 100
  assert runs.resolve_step(str(workdir), 40) == 40
  with pytest.raises(ValueError, match=r"No checkpoint at step 60.*\[20, 40, 100\]"):
    runs.resolve_step(str(workdir), 60)


def test_progress_lines_give_rate_and_eta():
  steps = runs.Progress(1000, 100, 0)
  rates = steps.update(100)
  line = steps.line(100, {"steps_per_s": 10.0, "images_per_s": 1000.0}, {"loss": 0.5})
  assert set(rates) == {"steps_per_s", "images_per_s"}
  assert line == ("step 100/1000 (10%) | loss 0.5 | 1000 img/s | 10.00 step/s | "
                  "ETA 0:01:30")
  images = runs.Progress(50, unit="image", label="certify", min_interval_s=3600)
  assert images.due(1)  # the first report is due at once
  assert not images.due(2)  # then only after min_interval_s...
  assert images.due(50)  # ...or at the end
  assert images.line(10, {"images_per_s": 0.5}) == (
      "certify 10/50 images (20%) | 2 s/image | ETA 0:01:20")


def _record(name, pathname, level=py_logging.INFO):
  return py_logging.LogRecord(name, level, pathname, 1, "message", None, None)


def test_library_info_lines_are_dropped_even_inside_a_checkout_named_certjax():
  keep = environment.OwnInfoOnly()
  # A checkout cloned into .../certjax/ with its .venv inside: orbax logs
  # through absl from a path containing '/certjax/'.
  orbax_path = "/home/me/certjax/.venv/lib/python3.11/site-packages/orbax/checkpoint/x.py"
  assert not keep.filter(_record("absl", orbax_path))
  assert not keep.filter(_record("orbax.checkpoint", orbax_path))
  assert keep.filter(_record("absl", orbax_path, py_logging.WARNING))
  # certjax's own lines pass, by logger name or by the module that logged.
  assert keep.filter(_record("certjax.runs", "/anywhere.py"))
  assert keep.filter(_record("absl", runs.checkpoints.__file__))
  assert keep.filter(_record("absl", os.path.join(os.path.dirname(runs.__file__), "..",
                                                  "runs", "files.py")))


def test_subprocess_environment_shares_the_compilation_cache(tmp_path):
  env = environment.subprocess_env("/repo", {"PYTHONPATH": "/other:/repo",
                                             environment.CACHE_ENV: str(tmp_path / "cache")})
  assert env["PYTHONPATH"] == "/repo:/other"
  assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "cache")
  assert np.isfinite(float(env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


class _MallInfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in (
      "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
      "fordblks", "keepcost")]


@pytest.mark.skipif(not environment.reuse_freed_host_memory(), reason="malloc is not glibc's")
def test_freed_host_memory_stays_in_the_heap_for_the_next_allocation(monkeypatch):
  # conftest applies the setting, as the launchers do. A 64 MiB block (above
  # glibc's default mmap threshold) must come from the heap, not from a fresh
  # mmap, and its pages must stay there after free (the heap is not trimmed).
  libc = ctypes.CDLL("libc.so.6")
  libc.mallinfo2.restype = _MallInfo2
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = [ctypes.c_void_p]
  size = 64 << 20
  before = libc.mallinfo2()
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  during = libc.mallinfo2()
  libc.free(block)
  after = libc.mallinfo2()
  assert during.hblkhd - before.hblkhd < size  # not an mmapped block
  assert after.arena >= size and after.fordblks >= size  # kept, free, in the heap
  monkeypatch.setenv(environment.HOST_MEMORY_ENV, "1")
  assert environment.reuse_freed_host_memory.__wrapped__() is False
