"""Signed checkpoints: every tampering is refused with a message naming it; good ones restore.

`python tests/runs/test_signing.py` prints the tampering table (case ->
message) for a closing note.
"""

import base64
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certjax import runs
from certjax.runs import signing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEP = 200
SHARDS = ("default/d/aaaa", "default/d/bbbb")


def write_key(path, curve=ec.SECP256R1):
  """A fresh EC key pair: PEM private key at `path`, public key at `path.pub`."""
  key = ec.generate_private_key(curve())
  with open(path, "wb") as f:
    f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
  with open(path + ".pub", "wb") as f:
    f.write(signing.public_pem(key.public_key()))
  return str(path)


def isolated_env(tmp, **extra):
  """An environment with an empty trust store and none of the CERTJAX signing variables."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("CERTJAX_")}
  env[signing.ENV_TRUST_DIR] = os.path.join(str(tmp), "trust_store")
  env.update(extra)
  return env


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
  directory = tmp_path_factory.mktemp("keys")
  return {"ours": write_key(os.path.join(directory, "ours.pem")),
          "theirs": write_key(os.path.join(directory, "theirs.pem"))}


@pytest.fixture(autouse=True)
def no_ambient_trust(monkeypatch, tmp_path):
  # The user's own trust store and CERTJAX_* variables must not decide a test.
  for name in list(os.environ):
    if name.startswith("CERTJAX_") and name != "CERTJAX_JAX_CACHE":
      monkeypatch.delenv(name)
  monkeypatch.setenv(signing.ENV_TRUST_DIR, str(tmp_path / "trust_store"))


def signer(keys, name="ours", tmp="/nonexistent", **kw):
  return signing.policy_from_config(None, isolated_env(tmp, CERTJAX_SIGNING_KEY=keys[name], **kw),
                                    sign=True)


def fake_step(checkpoints, step=STEP):
  """A step directory shaped like orbax's: metadata plus two array shards."""
  step_dir = os.path.join(checkpoints, str(step))
  contents = {"_CHECKPOINT_METADATA": b'{"init_timestamp_nsecs": 1}',
              "default/_METADATA": b'{"tree": {}}',
              SHARDS[0]: bytes(range(256)) * 4, SHARDS[1]: b"\x07" * 1000}
  for name, data in contents.items():
    os.makedirs(os.path.dirname(os.path.join(step_dir, name)), exist_ok=True)
    pathlib.Path(step_dir, name).write_bytes(data)
  return step_dir


# --------------------------------------------------------------------------- tampering


def flip_byte(path, offset):
  data = bytearray(pathlib.Path(path).read_bytes())
  data[offset] ^= 0x01
  pathlib.Path(path).write_bytes(bytes(data))


def _flip_byte(step_dir, tmp, keys):
  flip_byte(os.path.join(step_dir, SHARDS[0]), 100)


def _swap_shards(step_dir, tmp, keys):
  a, b = (pathlib.Path(step_dir, s) for s in SHARDS)
  da, db = a.read_bytes(), b.read_bytes()
  a.write_bytes(db)
  b.write_bytes(da)


def _remove_shard(step_dir, tmp, keys):
  os.remove(os.path.join(step_dir, SHARDS[1]))


def _add_file(step_dir, tmp, keys):
  pathlib.Path(step_dir, "default", "d", "cccc").write_bytes(b"extra")


def _edit_signature_json(step_dir, edit):
  path = pathlib.Path(step_dir, signing.SIGNATURE_FILE)
  bundle = json.loads(path.read_text())
  edit(bundle)
  path.write_text(json.dumps(bundle))


def _edit_manifest(step_dir, tmp, keys):
  # The attacker swaps a shard and writes its new hash into the manifest.
  pathlib.Path(step_dir, SHARDS[1]).write_bytes(b"\x00" * 1000)

  def edit(bundle):
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    for resource in statement["predicate"]["resources"]:
      if resource["name"] == SHARDS[1]:
        resource["digest"] = signing.file_digests(step_dir)[SHARDS[1]]
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
  _edit_signature_json(step_dir, edit)


def _edit_signature(step_dir, tmp, keys):
  def edit(bundle):
    sig = bytearray(base64.b64decode(bundle["dsseEnvelope"]["signatures"][0]["sig"]))
    sig[-1] ^= 0x01
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
  _edit_signature_json(step_dir, edit)


def _strip_key_hint(step_dir, tmp, keys):
  # Re-signed by another key with the hint removed: no key to pick, none verifies.
  signing.sign_directory(step_dir, signer(keys, "theirs"))
  _edit_signature_json(step_dir,
                       lambda b: b["verificationMaterial"]["publicKey"].update(hint=None))


def _garble_signature(step_dir, tmp, keys):
  pathlib.Path(step_dir, signing.SIGNATURE_FILE).write_text('{"mediaType": "x"}')


def _resign_with_other_key(step_dir, tmp, keys):
  _flip_byte(step_dir, tmp, keys)
  signing.sign_directory(step_dir, signer(keys, "theirs"))


def _unsign(step_dir, tmp, keys):
  os.remove(os.path.join(step_dir, signing.SIGNATURE_FILE))


def _rename_step(step_dir, tmp, keys):
  # A signed step 100 copied over step 200 (an older, weaker model swapped in).
  shutil.rmtree(step_dir)
  other = fake_step(os.path.dirname(step_dir), 100)
  signing.sign_directory(other, signer(keys))
  os.rename(other, step_dir)


def _symlink_shard(step_dir, tmp, keys):
  path = os.path.join(step_dir, SHARDS[0])
  target = os.path.join(str(tmp), "elsewhere.bin")
  shutil.copy(path, target)
  os.remove(path)
  os.symlink(target, path)


# case -> (tamper, require, expected message after 'checkpoint step 200 in <dir>: ')
TAMPERING = {
    "byte flipped in a shard": (_flip_byte, False,
                                r"hash mismatch for 'default/d/aaaa': signed sha256 \w+\.\.\., "
                                r"found \w+\.\.\."),
    "two shards' contents swapped": (_swap_shards, False,
                                     r"files 'default/d/aaaa' and 'default/d/bbbb' hold each "
                                     r"other's signed contents \(swapped\)"),
    "shard removed": (_remove_shard, False,
                      r"missing file 'default/d/bbbb' \(in the signed manifest, not on disk\)"),
    "file added": (_add_file, False,
                   r"unexpected file 'default/d/cccc' \(not in the signed manifest\)"),
    "manifest edited to match a swapped shard": (_edit_manifest, False,
                                                 r"the signature in certjax.sig does not verify "
                                                 r"with trusted key \w+\.\.\.: the signed "
                                                 r"manifest or the signature was edited"),
    "signature bytes edited": (_edit_signature, False,
                               r"the signature in certjax.sig does not verify"),
    "re-signed by another key, key hint removed": (_strip_key_hint, False,
                                                   r"the signature in certjax.sig does not "
                                                   r"verify with trusted key"),
    "signature file garbled": (_garble_signature, False,
                               r"certjax.sig is not a readable signature bundle"),
    "tampered and re-signed with an untrusted key": (_resign_with_other_key, False,
                                                     r"signed by key \w+\.\.\., which is not a "
                                                     r"trusted key \(trusted: \w+\.\.\.\)"),
    "unsigned where a signature is required": (_unsign, True,
                                               r"not signed \(no certjax.sig\), and unsigned "
                                               r"checkpoints are refused"),
    "signed step 100 renamed to step 200": (_rename_step, False,
                                            r"signed as step 100, found as step 200"),
    "shard replaced by a symlink": (_symlink_shard, False,
                                    r"'default/d/aaaa' is a symbolic link; checkpoints hold "
                                    r"files only"),
}


def tampered_message(case, tmp, keys):
  """Signs a fake step with our key, applies `case`, verifies trusting our key only."""
  tamper, require, _ = TAMPERING[case]
  checkpoints = os.path.join(str(tmp), "checkpoints")
  step_dir = fake_step(checkpoints)
  signing.sign_directory(step_dir, signer(keys))
  tamper(step_dir, tmp, keys)
  trust_ours = signing.policy_from_config(None, isolated_env(
      tmp, CERTJAX_TRUSTED_KEYS=keys["ours"] + ".pub", CERTJAX_REQUIRE_SIGNED=str(int(require))))
  try:
    runs.verify_step(checkpoints, STEP, trust_ours)
  except runs.CheckpointVerificationError as e:
    return checkpoints, str(e)
  return checkpoints, None


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_is_refused_naming_the_problem(case, tmp_path, keys):
  checkpoints, message = tampered_message(case, tmp_path, keys)
  assert message is not None, f"{case}: accepted"
  prefix = f"checkpoint step {STEP} in {checkpoints}: "
  assert message.startswith(prefix), message
  assert re.match(TAMPERING[case][2], message[len(prefix):]), message
  assert "\n" not in message


def test_signed_unsigned_and_untrusted_checkpoints_that_are_intact(tmp_path, keys):
  checkpoints = str(tmp_path / "checkpoints")
  step_dir = fake_step(checkpoints)
  expected_sha = signing.content_sha256(signing.file_digests(step_dir))
  unsigned = runs.verify_step(checkpoints, STEP, signing.policy_from_config(
      None, isolated_env(tmp_path)))
  assert unsigned == {"step": STEP, "signed": False, "verified": False, "key_fingerprint": None,
                      "sha256": expected_sha, "files": 4}
  made = signing.sign_directory(step_dir, signer(keys))
  assert made["sha256"] == expected_sha  # the signature file is not part of the contents
  ours = signer(keys)
  record = runs.verify_step(checkpoints, STEP, ours)
  assert record == {"step": STEP, "signed": True, "verified": True,
                    "key_fingerprint": ours.key_fingerprint, "sha256": expected_sha, "files": 4}
  # Signed, but nothing trusted here and nothing required: hashes are
  # checked (corruption is caught), authorship is not claimed.
  nobody = signing.policy_from_config(None, isolated_env(tmp_path))
  assert runs.verify_step(checkpoints, STEP, nobody)["verified"] is False
  _flip_byte(step_dir, tmp_path, keys)
  with pytest.raises(runs.CheckpointVerificationError, match="hash mismatch for 'default/d/aaaa'"):
    runs.verify_step(checkpoints, STEP, nobody)


def test_keys_come_from_config_environment_and_trust_store(tmp_path, keys):
  from certjax.training import config as config_lib
  config = config_lib.base_config()
  config.signing.key = keys["ours"]
  config.signing.trusted_keys = keys["theirs"] + ".pub"
  policy = signing.policy_from_config(config, isolated_env(tmp_path))
  fps = {k.fingerprint for k in policy.trusted}
  assert policy.key == keys["ours"] and len(fps) == 2 and not policy.require
  # The workdir's config contributes no trust when no config is given.
  assert signing.policy_from_config(None, isolated_env(tmp_path)).trusted == ()
  env = isolated_env(tmp_path, CERTJAX_REQUIRE_SIGNED="1")
  fp, stored = signing.trust_key(keys["theirs"] + ".pub", env)
  policy = signing.policy_from_config(None, env)
  assert policy.require and [k.fingerprint for k in policy.trusted] == [fp]
  assert os.path.dirname(stored) == env[signing.ENV_TRUST_DIR]
  with pytest.raises(ValueError, match="does not exist"):
    signing.policy_from_config(None, isolated_env(tmp_path, CERTJAX_TRUSTED_KEYS="/no/key.pub"))
  (tmp_path / "rsa.pem").write_bytes(b"not a key")
  with pytest.raises(ValueError, match="is not a PEM private key"):
    signing.policy_from_config(None, isolated_env(tmp_path,
                                                  CERTJAX_SIGNING_KEY=str(tmp_path / "rsa.pem")))
  # An encrypted key takes its password from the environment, never the config.
  fp2 = signing.generate_key(str(tmp_path / "enc"), password=b"pw")
  assert oct(os.stat(tmp_path / "enc").st_mode & 0o777) == "0o600"
  encrypted = isolated_env(tmp_path, CERTJAX_SIGNING_KEY=str(tmp_path / "enc"))
  with pytest.raises(ValueError, match="CERTJAX_SIGNING_KEY_PASSWORD"):
    signing.policy_from_config(None, encrypted, sign=True)
  # Verifying needs only the public half (enc.pub): no password.
  assert signing.policy_from_config(None, encrypted).key_fingerprint == fp2
  assert signing.policy_from_config(None, {**encrypted, "CERTJAX_SIGNING_KEY_PASSWORD": "pw"},
                                    sign=True).key_fingerprint == fp2


# --------------------------------------------------------------------------- real orbax


def _tiny_state():
  return {"step": jnp.int32(7), "params": {"w": jnp.arange(12.0).reshape(3, 4)},
          "model_state": {}, "opt_state": {"mu": jnp.ones((3, 4))}}


@pytest.fixture(scope="module")
def orbax_workdir(tmp_path_factory, keys):
  """A workdir with one real orbax checkpoint (step 7), signed through save_checkpoint."""
  workdir = str(tmp_path_factory.mktemp("orbax"))
  manager = runs.make_manager(workdir, keep=3)
  record = runs.save_checkpoint(manager, 7, _tiny_state(), signer(keys))
  manager.close()
  return workdir, record


def test_real_checkpoint_is_signed_listed_and_restored(orbax_workdir, keys):
  workdir, record = orbax_workdir
  assert record["step"] == 7 and record["signed"]
  step_dir = runs.step_directory(workdir, 7)
  assert os.path.exists(os.path.join(step_dir, signing.SIGNATURE_FILE))
  # orbax still lists and restores the step with the signature inside it.
  manager = runs.make_manager(workdir, keep=3)
  assert manager.all_steps() == [7] and runs.checkpoint_steps(workdir) == [7]
  restored = manager.restore(7, args=ocp.args.StandardRestore(_tiny_state()))
  np.testing.assert_array_equal(restored["params"]["w"], np.arange(12.0).reshape(3, 4))
  manager.close()
  variables = runs.restore_variables(workdir, 7, policy=signer(keys))
  np.testing.assert_array_equal(variables["params"]["w"], np.arange(12.0).reshape(3, 4))


def test_real_checkpoint_with_a_flipped_shard_byte_is_not_restored(orbax_workdir, keys, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(orbax_workdir[0], workdir)
  step_dir = runs.step_directory(workdir, 7)
  shards = sorted(name for name in signing.file_digests(step_dir) if "/d/" in name)
  path = os.path.join(step_dir, shards[0])
  flip_byte(path, os.path.getsize(path) // 2)
  with pytest.raises(runs.CheckpointVerificationError,
                     match=rf"checkpoint step 7 in {workdir}/checkpoints: hash mismatch for "
                           rf"'{shards[0]}'"):
    runs.restore_variables(workdir, 7, policy=signer(keys))


def test_launch_sign_verifies_in_one_line_per_step(orbax_workdir, keys, tmp_path):
  from launch import sign as sign_launcher
  workdir = str(tmp_path / "w")
  shutil.copytree(orbax_workdir[0], workdir)
  lines = sign_launcher.verify(workdir, [keys["ours"] + ".pub"])
  assert len(lines) == 1 and lines[0].startswith("step 7: verified, signed by")
  with pytest.raises(runs.CheckpointVerificationError, match="not a trusted key"):
    sign_launcher.verify(workdir, [keys["theirs"] + ".pub"])
  # Re-signing needs --force; signing with another key then verifies with that key.
  assert sign_launcher.sign(workdir, keys["theirs"]) == [
      "step 7: already signed (--force re-signs)"]
  assert "signed by" in sign_launcher.sign(workdir, keys["theirs"], force=True)[0]
  assert sign_launcher.verify(workdir, [keys["theirs"] + ".pub"])[0].startswith("step 7: verified")
  os.remove(os.path.join(runs.step_directory(workdir, 7), signing.SIGNATURE_FILE))
  with pytest.raises(runs.CheckpointVerificationError, match="not signed"):
    sign_launcher.verify(workdir)
  assert sign_launcher.verify(workdir, require=False)[0].startswith("step 7: not signed")
  out = tmp_path / "new_key"
  lines = sign_launcher.keygen(str(out))
  assert os.path.exists(out) and os.path.exists(str(out) + ".pub") and "Trusted it" in lines[2]


def test_launch_sign_cli_help_and_one_line_error(orbax_workdir, keys, tmp_path):
  env = isolated_env(tmp_path)
  env["PYTHONPATH"] = ROOT
  helped = subprocess.run([sys.executable, "-m", "launch.sign", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  flags_part = helped.stdout.split("\nflags:\n", 1)[-1]
  for flag in ("--workdir", "--key", "--public_key", "--step", "--out", "--[no]traceback"):
    assert f"  {flag}:" in flags_part, helped.stdout[-3000:]
  workdir = str(tmp_path / "w")
  shutil.copytree(orbax_workdir[0], workdir)
  proc = subprocess.run([sys.executable, "-m", "launch.sign", "verify", f"--workdir={workdir}",
                         f"--public_key={keys['theirs']}.pub"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  errors = [line for line in proc.stderr.splitlines() if line.startswith("certjax error:")]
  theirs = signing.fingerprint(signing.load_public_key(keys["theirs"] + ".pub"))
  assert errors == [f"certjax error: checkpoint step 7 in {workdir}/checkpoints: signed by key "
                    f"{signer(keys).key_fingerprint[:16]}..., which is not a trusted key "
                    f"(trusted: {theirs[:16]}...). Trust it only if you trust who made it: "
                    "python -m launch.sign trust --public_key=<their .pub>."], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr


def main():
  """Prints the tampering table: case -> the error that stops the run."""
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    os.environ[signing.ENV_TRUST_DIR] = os.path.join(tmp, "trust_store")
    keys_ = {name: write_key(os.path.join(tmp, f"{name}.pem")) for name in ("ours", "theirs")}
    print("| case | message |\n| --- | --- |")
    for i, case in enumerate(TAMPERING):
      work = os.path.join(tmp, f"case{i}")
      os.makedirs(work)
      _, message = tampered_message(case, work, keys_)
      print(f"| {case} | `certjax error: {message.replace(work, '...')}` |")


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  main()
