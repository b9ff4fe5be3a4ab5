r"""Signs, verifies and trusts the checkpoints of certjax workdirs.

    python -m launch.sign keygen --out=~/.config/certjax/signing_key
    python -m launch.sign sign   --workdir=/tmp/certjax/run --key=~/.config/certjax/signing_key
    python -m launch.sign verify --workdir=/tmp/certjax/run [--public_key=colleague.pub]
    python -m launch.sign trust  --public_key=colleague.pub

keygen  writes an EC private key (mode 0600) to --out and its public key to
        <out>.pub, and trusts the public key (the trust store,
        $CERTJAX_TRUST_DIR or ~/.config/certjax/trusted_keys; --notrust skips
        it). $CERTJAX_SIGNING_KEY_PASSWORD, if set, encrypts the private key.
sign    signs every unsigned checkpoint of --workdir (or --step) with --key
        (default $CERTJAX_SIGNING_KEY); --force re-signs signed ones. Signing
        vouches for the files as they are now: sign only checkpoints you made.
verify  checks every checkpoint of --workdir (or --step) against its
        signature: signed by a trusted key (the trust store, $CERTJAX_TRUSTED_KEYS,
        --public_key), every file's hash as signed, the step as signed. An
        unsigned checkpoint fails unless --norequire. Prints one line per step;
        any failure ends with `certjax error: ...` and exit code 1.
trust   adds --public_key to the trust store (the keys training resumes,
        launch.evaluate and runs.restore_model accept).

--config (optional): the run's config file; sign takes its signing.key, verify
its signing.trusted_keys and signing.require, as training and evaluation do.

Training signs every checkpoint it writes when it has a key
(--config.signing.key=... or $CERTJAX_SIGNING_KEY), and every restore checks
signatures; --config.signing.require=True or $CERTJAX_REQUIRE_SIGNED=1 refuses
unsigned checkpoints. See certjax/runs/signing.py.
"""

from __future__ import annotations

import dataclasses
import os

from absl import app, flags

from launch import common

COMMANDS = ("keygen", "sign", "verify", "trust")
FLAGS = flags.FLAGS
common.define_config_and_workdir(
    "Optional: the run's config file (sign: its signing.key; verify: its signing.trusted_keys "
    "and signing.require).",
    "sign, verify: the training workdir (holds checkpoints/).", required=False)
flags.DEFINE_string("key", None, "sign: the PEM EC private key (default: --config's "
                    "signing.key, else $CERTJAX_SIGNING_KEY).")
flags.DEFINE_multi_string("public_key", [],
                          "verify: a PEM public key to trust besides the trust store and "
                          "$CERTJAX_TRUSTED_KEYS (repeatable); trust: the key to add.")
flags.DEFINE_integer("step", None, "sign, verify: only this checkpoint step (default: all).")
flags.DEFINE_string("out", None, "keygen: where to write the private key (<out>.pub: public).")
flags.DEFINE_enum("curve", "secp256r1", ["secp256r1", "secp384r1", "secp521r1"],
                  "keygen: the elliptic curve.")
flags.DEFINE_bool("trust", True, "keygen: add the new public key to the trust store.")
flags.DEFINE_bool("force", False, "keygen: replace existing key files; sign: re-sign signed "
                  "checkpoints.")
flags.DEFINE_bool("require", True, "verify: an unsigned checkpoint is a failure.")


def _steps(workdir: str, step: int | None) -> list[int]:
  from certjax import runs  # pylint: disable=g-import-not-at-top
  if step is not None:
    return [runs.resolve_step(workdir, step)]
  steps = runs.checkpoint_steps(workdir)
  if not steps:
    runs.resolve_step(workdir)  # raises the usual "No checkpoint in ..." error
  return steps


def keygen(out: str, curve: str = "secp256r1", trust: bool = True, force: bool = False
           ) -> list[str]:
  """Writes a key pair (and trusts its public key); returns the lines to print."""
  from certjax.runs import signing  # pylint: disable=g-import-not-at-top
  if not out:
    raise ValueError("keygen needs --out=<path of the private key to write>.")
  password = os.environ.get(signing.ENV_KEY_PASSWORD)
  path = os.path.abspath(os.path.expanduser(out))
  fp = signing.generate_key(path, curve=curve, password=password.encode() if password else None,
                            overwrite=force)
  lines = [f"Wrote the private key {path} (keep it secret) and the public key {path}.pub.",
           f"Fingerprint: {fp}"]
  if trust:
    _, stored = signing.trust_key(path + ".pub")
    lines.append(f"Trusted it: {stored}")
  lines.append(f"Sign checkpoints while training: --config.signing.key={path} or "
               f"export {signing.ENV_KEY}={path}")
  return lines


def _with_key(config, key: str | None):
  """`config`'s signing section (or an empty one) with `key` as the signing key, if given."""
  section = dict(config.get("signing") or {}) if config is not None else {}
  if key:
    section["key"] = key
  return {"signing": section}


def sign(workdir: str, key: str | None = None, step: int | None = None, force: bool = False,
         config=None) -> list[str]:
  """Signs the checkpoints of `workdir`; returns the lines to print."""
  from certjax import runs  # pylint: disable=g-import-not-at-top
  from certjax.runs import signing  # pylint: disable=g-import-not-at-top
  if not workdir:
    raise ValueError("sign needs --workdir.")
  policy = signing.policy_from_config(_with_key(config, key), sign=True)
  if not policy.key:
    raise ValueError(f"sign needs --key=<private key> (or ${signing.ENV_KEY}).")
  lines = []
  directory = os.path.join(os.path.abspath(workdir), runs.CHECKPOINT_DIR)
  for s in _steps(workdir, step):
    existing = os.path.join(directory, str(s), signing.SIGNATURE_FILE)
    if os.path.exists(existing) and not force:
      lines.append(f"step {s}: already signed (--force re-signs)")
      continue
    record = runs.sign_step(directory, s, policy)
    lines.append(f"step {s}: signed by {record['key_fingerprint'][:16]}...; {record['files']} "
                 f"files, sha256 {record['sha256']}")
  return lines


def verify(workdir: str, public_keys: list[str] | tuple[str, ...] = (), step: int | None = None,
           require: bool = True, config=None) -> list[str]:
  """Verifies the checkpoints of `workdir`; returns the lines to print.

  Raises:
    runs.CheckpointVerificationError: naming the first checkpoint that fails
      (after every step was checked and reported).
  """
  from certjax import runs  # pylint: disable=g-import-not-at-top
  from certjax.runs import signing  # pylint: disable=g-import-not-at-top
  if not workdir:
    raise ValueError("verify needs --workdir.")
  env = dict(os.environ)
  env[signing.ENV_TRUSTED] = ",".join(
      p for p in [env.get(signing.ENV_TRUSTED, ""), *public_keys] if p)
  policy = signing.policy_from_config(config, env)
  policy = dataclasses.replace(policy, require=require or policy.require)
  lines, failures = [], []
  for s in _steps(workdir, step):
    try:
      record = runs.verify_checkpoint(workdir, s, policy)
    except runs.CheckpointVerificationError as e:
      failures.append(str(e))
      lines.append(f"step {s}: FAILED: {e}")
      continue
    if not record["signed"]:
      how = "not signed"
    elif record["verified"]:
      how = f"verified, signed by {record['key_fingerprint'][:16]}..."
    else:
      how = (f"file hashes match, but signer {record['key_fingerprint'][:16]}... is not "
             "trusted here")
    lines.append(f"step {s}: {how}; {record['files']} files, sha256 {record['sha256']}")
  if failures:
    print("\n".join(lines), flush=True)
    more = f" ({len(failures) - 1} more failed; listed above)" if len(failures) > 1 else ""
    raise runs.CheckpointVerificationError(failures[0] + more)
  return lines


def trust(public_keys: list[str] | tuple[str, ...]) -> list[str]:
  """Adds public keys to the trust store; returns the lines to print."""
  from certjax.runs import signing  # pylint: disable=g-import-not-at-top
  if not public_keys:
    raise ValueError("trust needs --public_key=<PEM public key>.")
  lines = []
  for path in public_keys:
    fp, stored = signing.trust_key(path)
    lines.append(f"Trusted {fp} ({path}) -> {stored}")
  return lines


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"Give one command: {', '.join(COMMANDS)} (got {argv[1:]}).")
  common.quiet_library_logs()
  command = argv[1]
  run = {
      "keygen": lambda: keygen(FLAGS.out, FLAGS.curve, FLAGS.trust, FLAGS.force),
      "sign": lambda: sign(FLAGS.workdir, FLAGS.key, FLAGS.step, FLAGS.force, FLAGS.config),
      "verify": lambda: verify(FLAGS.workdir, FLAGS.public_key, FLAGS.step, FLAGS.require,
                               FLAGS.config),
      "trust": lambda: trust(FLAGS.public_key),
  }[command]
  lines = common.run_reporting_errors(run)
  print("\n".join(lines), flush=True)


if __name__ == "__main__":
  app.run(main)
