"""Provenance: config hash, data hashes (training split and evaluated examples), git, history."""

import json
import os
import subprocess

import jax
import ml_collections
import numpy as np
import pytest

from certjax import evaluation
from certjax import parallel
from certjax.data import sources
from certjax.evaluation import common
from certjax.runs import checkpoints
from certjax.runs import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _arrays(n=12, seed=0):
  rng = np.random.default_rng(seed)
  return rng.random((n, 4, 4, 1), dtype=np.float32), rng.integers(0, 10, n).astype(np.int32)


def test_config_hash_is_reproducible_from_config_json(tmp_path):
  config = ml_collections.ConfigDict({"b": 1, "a": {"eps_list": (0.1, 0.3), "name": "x"}})
  checkpoints.write_config(str(tmp_path), config)
  with open(tmp_path / "config.json") as f:
    written = json.load(f)
  assert provenance.config_sha256(written) == provenance.config_sha256(config)
  config.a.name = "y"
  assert provenance.config_sha256(written) != provenance.config_sha256(config)


def test_example_hash_ignores_batching_and_sees_one_pixel_or_label():
  x, y = _arrays()
  whole = provenance.examples_sha256(x, y)
  # Hosts hash their shares; gathered in order, the digests give the same hash.
  parts = np.concatenate([provenance.example_digests(x[:5], y[:5]),
                          provenance.example_digests(x[5:], y[5:])])
  assert provenance.combine_digests(parts) == whole
  x2 = x.copy()
  x2[7, 1, 2, 0] = np.nextafter(x2[7, 1, 2, 0], 2.0)
  y2 = y.copy()
  y2[3] = (y2[3] + 1) % 10
  assert len({whole, provenance.examples_sha256(x2, y), provenance.examples_sha256(x, y2),
              provenance.examples_sha256(x[::-1], y[::-1])}) == 4


def test_evaluated_data_hash_comes_from_what_was_loaded(monkeypatch):
  x, y = _arrays()
  expected = provenance.examples_sha256(x[2:10], y[2:10])
  base = evaluation.EvalData.from_arrays(x, y)
  loads = []

  def load(indices):
    loads.append(np.asarray(indices).tolist())
    return base.load(indices)

  def selection():  # a new EvalData object each time: nothing hashed yet
    return evaluation.EvalData(np.arange(2, 10), load, "toy", "test")

  data = selection()
  common.HostShare(data)
  record = common.data_provenance(data)
  assert record["sha256"] == expected and loads == [list(range(2, 10))]  # no second read
  assert (record["name"], record["split"], record["num_examples"]) == ("toy", "test", 8)
  assert (record["examples_hashed"], record["examples_reread"]) == (8, 0)
  # Examples the evaluator did not load (here: it loaded the first 3) are read
  # again and hashed.
  data = selection()
  common.note_loaded(data, data.indices[:3], *base.load(data.indices[:3]))
  record = common.data_provenance(data)
  assert record["sha256"] == expected and record["examples_reread"] == 5
  # Beyond the re-read cap the hash covers what was loaded, and says so.
  monkeypatch.setattr(common, "MAX_REREAD_EXAMPLES", 0)
  data = selection()
  common.note_loaded(data, data.indices[:3], *base.load(data.indices[:3]))
  record = common.data_provenance(data)
  assert record["examples_hashed"] == 3 and "not read again" in record["note"]
  assert record["sha256"] == provenance.examples_sha256(x[2:5], y[2:5])


def test_two_hosts_give_the_hash_of_one(monkeypatch):
  # Host h of 2 loads its share (6 + 5 of 11 examples, the second padded);
  # the gathered per-example digests hash like one host's whole selection.
  x, y = _arrays(11)
  real_share = parallel.host_share
  gathered = {}

  def as_host(host):
    monkeypatch.setattr(parallel, "host_share", lambda count, index=None, processes=None:
                        real_share(count, host if index is None else index,
                                   2 if processes is None else processes))

  def allgather(tree):
    gathered[host] = tree
    other = gathered.get(1 - host, tree)
    pair = (tree, other) if host == 0 else (other, tree)
    return jax.tree.map(lambda a, b: np.stack([a, b]), *pair)

  monkeypatch.setattr(parallel, "process_allgather", allgather)
  records = {}
  for host in (1, 0):  # host 1 first: host 0's gather then sees both shares
    as_host(host)
    data = evaluation.EvalData.from_arrays(x, y)
    share = common.HostShare(data)
    assert share.indices.size == (6 if host == 0 else 5)
    records[host] = common.data_provenance(data)
  assert records[0]["sha256"] == provenance.examples_sha256(x, y)
  assert records[0]["examples_hashed"] == 11 and records[0]["examples_reread"] == 0


def test_training_split_hash_streams_the_source(monkeypatch):
  x = np.arange(30 * 5 * 5, dtype=np.uint8).reshape(30, 5, 5, 1)
  y = np.arange(30, dtype=np.int32) % 10
  monkeypatch.setattr(sources, "open_source", lambda cfg, split: sources.ArraySource(x, y))
  config = ml_collections.ConfigDict({"name": "mnist5k"})
  full = provenance.split_digest(config, "train", -1)
  assert full["examples_hashed"] == full["num_examples"] == 30
  assert provenance.split_digest(config, "train", 30) == full
  sampled = provenance.split_digest(config, "train", 10)
  assert sampled["examples_hashed"] == 10 and sampled["sha256"] != full["sha256"]
  assert provenance.split_digest(config, "train", 0)["sha256"] is None
  x[29, 4, 4, 0] ^= 1  # one pixel of the last example
  assert provenance.split_digest(config, "train", -1)["sha256"] != full["sha256"]


def test_git_state_names_this_checkout():
  if not os.path.exists(os.path.join(ROOT, ".git")):
    pytest.skip("not a git checkout")
  head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                        text=True, check=True).stdout.strip()
  state = provenance.git_state()
  assert state["commit"] == head and isinstance(state["dirty"], bool)


def test_a_resumed_run_appends_to_the_history(tmp_path):
  workdir = str(tmp_path)
  provenance.append_training_entry(workdir, {"start_step": 0, "end_step": None})
  provenance.finish_training_entry(workdir, end_step=40, checkpoints={40: "abc"})
  provenance.append_training_entry(workdir, {"start_step": 40, "end_step": None})
  history = provenance.read(workdir)["history"]
  assert [h["start_step"] for h in history] == [0, 40]
  assert history[0]["end_step"] == 40 and history[0]["checkpoints"] == {"40": "abc"}
  assert history[1]["end_step"] is None  # not finished (yet)
  assert sorted(os.listdir(workdir)) == [provenance.FILE]  # atomic writes leave no temporaries
