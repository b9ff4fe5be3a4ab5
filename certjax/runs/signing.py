"""Signed checkpoints: a manifest of file hashes, signed with an EC key, checked on restore.

Every checkpoint step directory (`<workdir>/checkpoints/<step>/`) can carry a
signature, `<step>/certjax.sig`, written after orbax has finished the step. It
is a Sigstore bundle made by sigstore's `model-signing` library (key signing,
offline): a DSSE envelope around an in-toto statement whose subject is the
step ("200") and whose predicate lists every file of the step directory with
its sha256 (the manifest), signed with an elliptic-curve private key (P-256,
P-384 or P-521). The signature file itself is the only file left out of the
manifest. orbax ignores a plain file it did not write in a step directory: it
still lists, restores and deletes the step (and the signature with it).

Where keys come from (`policy_from_config`), for a researcher and for CI:

  signing key (signs new checkpoints): `config.signing.key`, else
    $CERTJAX_SIGNING_KEY; a PEM private key file (encrypted keys take their
    password from $CERTJAX_SIGNING_KEY_PASSWORD, never from the config, which
    is written into the workdir). None: checkpoints are written unsigned.
  trusted keys (verify): the public half of the signing key; every PEM public
    key in `config.signing.trusted_keys` and $CERTJAX_TRUSTED_KEYS
    (comma-separated files or directories of *.pub files); and the trust store
    $CERTJAX_TRUST_DIR (default ~/.config/certjax/trusted_keys), which
    `python -m launch.sign trust` and `keygen` fill.
  require: `config.signing.require` or $CERTJAX_REQUIRE_SIGNED=1 refuses
    checkpoints that are not signed by a trusted key.

Trust never comes from the workdir being checked: a restore that reads the
workdir's own config.json (no config given) uses the environment and the
trust store only, since whoever can swap a checkpoint can edit config.json.

What is verified on restore (`verify_directory`):
  * signed by a trusted key: the signature (ECDSA over the statement), every
    file's sha256 against the manifest (a changed, swapped, missing or added
    file is refused, naming it), and that the statement names this step (a
    step directory copied or renamed over another is refused);
  * signed, but no trusted key configured and `require` unset: the file
    hashes against the manifest (integrity, not authenticity), with a
    warning;
  * signed by a key that is not trusted while trusted keys are configured, or
    unsigned while `require` is set: refused;
  * unsigned, `require` unset: restored with a logged note.
Every refusal is one `CheckpointVerificationError` (a ValueError, so the
launchers print it as one line), starting with
`checkpoint step <step> in <checkpoints directory>: ...`.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import ml_collections
from absl import logging

SIGNATURE_FILE = "certjax.sig"
ENV_KEY = "CERTJAX_SIGNING_KEY"
ENV_KEY_PASSWORD = "CERTJAX_SIGNING_KEY_PASSWORD"
ENV_TRUSTED = "CERTJAX_TRUSTED_KEYS"
ENV_REQUIRE = "CERTJAX_REQUIRE_SIGNED"
ENV_TRUST_DIR = "CERTJAX_TRUST_DIR"
CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what model-signing accepts
_CHUNK = 1 << 20
# How the manifest is built, on both sides: sha256 of every file, the
# signature file left out, no symlinks, and no git files skipped silently.
_HASHING = {"hash_type": "sha256", "method": "files"}


class CheckpointVerificationError(ValueError):
  """A checkpoint that fails verification (tampered, untrusted or unsigned where required)."""


def default_config() -> ml_collections.ConfigDict:
  """`config.signing`: the signing key, the trusted keys and whether a signature is required."""
  return ml_collections.ConfigDict({
      # PEM EC private key that signs every checkpoint this run writes; '':
      # $CERTJAX_SIGNING_KEY, else checkpoints are written unsigned.
      "key": "",
      # Comma-separated PEM public keys (files, or directories of *.pub)
      # whose signatures are accepted, besides $CERTJAX_TRUSTED_KEYS, the
      # trust store and the signing key's own public key.
      "trusted_keys": "",
      # Refuse checkpoints not signed by a trusted key (also
      # $CERTJAX_REQUIRE_SIGNED=1).
      "require": False,
  })


def validate_config(section: Any, where: str = "signing") -> None:
  """Checks the types of a `config.signing` section.

  Raises:
    ValueError: naming the key.
  """
  for key in ("key", "trusted_keys"):
    if not isinstance(section.get(key, ""), str):
      raise ValueError(f"{where}.{key} must be a string (a path; trusted_keys: comma-separated "
                       f"paths); got {section.get(key)!r}.")
  if not isinstance(section.get("require", False), bool):
    raise ValueError(f"{where}.require must be True or False; got {section.get('require')!r}.")


# --------------------------------------------------------------------------- keys


def _serialization():
  from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top
  return serialization


def public_pem(public_key: Any) -> bytes:
  """The SubjectPublicKeyInfo PEM of a public key (what fingerprints are taken of)."""
  s = _serialization()
  return public_key.public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(public_key: Any) -> str:
  """sha256 of the key's PEM, hex: the key hint model-signing writes into a signature."""
  return hashlib.sha256(public_pem(public_key)).hexdigest()


def _check_curve(key: Any, path: str, kind: str) -> None:
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
  public = key.public_key() if kind == "private" else key
  if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name not in CURVES:
    what = getattr(getattr(public, "curve", None), "name", type(public).__name__)
    raise ValueError(f"{path}: a {what} key; checkpoint signing takes elliptic-curve keys on "
                     f"{', '.join(CURVES)} (python -m launch.sign keygen makes one).")


def load_public_key(path: str) -> Any:
  """A PEM EC public key (or the public half of a PEM private key) from `path`.

  Raises:
    ValueError: the file is missing or holds no supported key, naming it.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f"Trusted key {path!r} cannot be read ({e.strerror}).") from None
  s = _serialization()
  try:
    key = s.load_pem_public_key(data)
  except ValueError:
    raise ValueError(f"Trusted key {path!r} is not a PEM public key.") from None
  _check_curve(key, path, "public")
  return key


def load_private_key(path: str, password: bytes | None = None) -> Any:
  """A PEM EC private key from `path` (`password` for an encrypted one).

  Raises:
    ValueError: missing file, wrong or missing password, or not an EC key.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f"Signing key {path!r} cannot be read ({e.strerror}); set "
                     f"signing.key or ${ENV_KEY} to a PEM EC private key "
                     "(python -m launch.sign keygen makes one).") from None
  try:
    key = _serialization().load_pem_private_key(data, password)
  except TypeError as e:  # encrypted without a password, or a password for a plain key
    raise ValueError(f"Signing key {path!r}: {e} (the password comes from "
                     f"${ENV_KEY_PASSWORD}).") from None
  except ValueError as e:
    raise ValueError(f"Signing key {path!r} is not a PEM private key, or the password in "
                     f"${ENV_KEY_PASSWORD} is wrong ({e}).") from None
  _check_curve(key, path, "private")
  return key


def generate_key(path: str, *, curve: str = "secp256r1", password: bytes | None = None,
                 overwrite: bool = False) -> str:
  """Writes a new EC private key to `path` (mode 0600) and its public key to `path.pub`.

  Returns:
    The public key's fingerprint.

  Raises:
    ValueError: an unsupported curve, or `path` exists and `overwrite` is False.
  """
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
  if curve not in CURVES:
    raise ValueError(f"Unknown curve {curve!r}; accepted: {', '.join(CURVES)}.")
  path = os.path.abspath(os.path.expanduser(path))
  for target in (path, path + ".pub"):
    if os.path.exists(target) and not overwrite:
      raise ValueError(f"{target} exists; choose another path or pass --force to replace it.")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  key = ec.generate_private_key(getattr(ec, curve.upper())())
  s = _serialization()
  encryption = s.BestAvailableEncryption(password) if password else s.NoEncryption()
  private = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, encryption)
  if overwrite and os.path.exists(path):
    os.remove(path)
  # Created 0600 from the start: the key is never readable by others, not even briefly.
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
  with os.fdopen(fd, "wb") as f:
    f.write(private)
  with open(path + ".pub", "wb") as f:
    f.write(public_pem(key.public_key()))
  return fingerprint(key.public_key())


def trust_dir(environ: Mapping[str, str] | None = None) -> str:
  """The trust store: $CERTJAX_TRUST_DIR, else $XDG_CONFIG_HOME (~/.config)/certjax/trusted_keys."""
  env = os.environ if environ is None else environ
  if env.get(ENV_TRUST_DIR):
    return os.path.abspath(os.path.expanduser(env[ENV_TRUST_DIR]))
  base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
  return os.path.join(base, "certjax", "trusted_keys")


def trust_key(public_key_path: str, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
  """Copies a public key into the trust store as `<fingerprint>.pub`.

  Returns:
    (fingerprint, the stored file's path).
  """
  key = load_public_key(public_key_path)
  fp = fingerprint(key)
  directory = trust_dir(environ)
  os.makedirs(directory, exist_ok=True)
  target = os.path.join(directory, f"{fp}.pub")
  with open(target, "wb") as f:
    f.write(public_pem(key))
  return fp, target


@dataclasses.dataclass(frozen=True)
class TrustedKey:
  """A public key signatures are accepted from: its fingerprint, PEM file and origin."""
  fingerprint: str
  path: str
  source: str


_DERIVED_DIR: list[str] = []


def _derived_public_key_file(key: Any) -> str:
  """A PEM file holding `key`'s public key (model-signing verifies against a file)."""
  if not _DERIVED_DIR:
    _DERIVED_DIR.append(tempfile.mkdtemp(prefix="certjax_keys_"))
    atexit.register(shutil.rmtree, _DERIVED_DIR[0], ignore_errors=True)
  path = os.path.join(_DERIVED_DIR[0], f"{fingerprint(key)}.pub")
  if not os.path.exists(path):
    with open(path, "wb") as f:
      f.write(public_pem(key))
  return path


def _key_files(spec: str, source: str) -> list[tuple[str, str]]:
  """(path, source) of every key file a comma-separated list of files or directories names."""
  found = []
  for item in (p.strip() for p in spec.split(",")):
    if not item:
      continue
    item = os.path.expanduser(item)
    if os.path.isdir(item):
      found += [(os.path.join(item, n), source) for n in sorted(os.listdir(item))
                if n.endswith(".pub")]
    elif os.path.exists(item):
      found.append((item, source))
    else:
      raise ValueError(f"Trusted key {item!r} (from {source}) does not exist.")
  return found


@dataclasses.dataclass(frozen=True)
class SigningPolicy:
  """How checkpoints are signed and verified (see the module docstring).

  Attributes:
    key: the private key file that signs new checkpoints, or None.
    password: its password (from the environment), or None.
    trusted: the keys whose signatures are accepted.
    require: refuse checkpoints not signed by a trusted key.
    key_fingerprint: the signing key's fingerprint, or None.
  """
  key: str | None = None
  password: bytes | None = None
  trusted: tuple[TrustedKey, ...] = ()
  require: bool = False
  key_fingerprint: str | None = None

  def describe(self) -> dict[str, Any]:
    """What provenance records of the policy (no secrets, no paths to them)."""
    return {"key_fingerprint": self.key_fingerprint, "require": self.require,
            "trusted_keys": sorted({k.fingerprint for k in self.trusted})}


def _truthy(value: str | None) -> bool:
  return (value or "").strip().lower() in ("1", "true", "yes", "on")


def policy_from_config(config: Any = None, environ: Mapping[str, str] | None = None, *,
                       sign: bool = False) -> SigningPolicy:
  """The signing policy of a run: `config.signing` (if any), the environment, the trust store.

  Args:
    config: a run config with a `signing` section, or None to use the
      environment and the trust store alone (as when the config was read from
      the workdir being checked).
    environ: the environment (default os.environ).
    sign: the policy will sign: the private key is loaded now (a wrong
      password stops the run before training, not at its first checkpoint).
      Otherwise the signing key's public half is read from `<key>.pub` where
      there is one (an evaluation needs no password), else from the key.

  Raises:
    ValueError: a key file that is missing or not a supported key, naming it.
  """
  env = os.environ if environ is None else environ
  section = config.get("signing") if config is not None and hasattr(config, "get") else None
  section = section if section is not None else {}
  key = str(section.get("key", "") or env.get(ENV_KEY, "") or "")
  password = env.get(ENV_KEY_PASSWORD)
  password_bytes = password.encode() if password else None
  trusted: dict[str, TrustedKey] = {}
  key_fp = None
  if key:
    key = os.path.abspath(os.path.expanduser(key))
    if not sign and os.path.exists(key + ".pub"):
      public, public_path = load_public_key(key + ".pub"), key + ".pub"
    else:
      public = load_private_key(key, password_bytes).public_key()
      public_path = _derived_public_key_file(public)
    key_fp = fingerprint(public)
    trusted[key_fp] = TrustedKey(key_fp, public_path, "the signing key")
  sources = _key_files(str(section.get("trusted_keys", "") or ""), "signing.trusted_keys")
  sources += _key_files(env.get(ENV_TRUSTED, ""), f"${ENV_TRUSTED}")
  store = trust_dir(env)
  if os.path.isdir(store):
    sources += _key_files(store, f"the trust store {store}")
  for path, source in sources:
    fp = fingerprint(load_public_key(path))
    trusted.setdefault(fp, TrustedKey(fp, os.path.abspath(path), source))
  require = bool(section.get("require", False)) or _truthy(env.get(ENV_REQUIRE))
  return SigningPolicy(key or None, password_bytes, tuple(trusted.values()), require, key_fp)


# --------------------------------------------------------------------------- manifests


def file_digests(directory: str) -> dict[str, str]:
  """sha256 (hex) of every file under `directory` by POSIX relative path, the signature left out.

  The same digests model-signing's manifest holds ('files' serialization).

  Raises:
    CheckpointVerificationError: a symbolic link (model-signing refuses them too:
      a link could point anywhere).
  """
  digests = {}
  for root, dirs, names in os.walk(directory):
    dirs.sort()
    for name in sorted(names) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory).replace(os.sep, "/")
      if rel == SIGNATURE_FILE:
        continue
      if os.path.islink(path):
        raise CheckpointVerificationError(
            f"{rel!r} is a symbolic link; checkpoints hold files only.")
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
          h.update(chunk)
      digests[rel] = h.hexdigest()
  return digests


def content_sha256(digests: Mapping[str, str]) -> str:
  """One sha256 naming a directory's contents: over 'path<TAB>sha256<LF>' lines, sorted by path.

  Recorded in provenance for signed and unsigned checkpoints alike, so a
  result file names the exact checkpoint bytes it was computed from.
  """
  text = "".join(f"{name}\t{digests[name]}\n" for name in sorted(digests))
  return hashlib.sha256(text.encode()).hexdigest()


def _short(digest: str) -> str:
  return digest[:16] + "..."


def describe_differences(expected: Mapping[str, str], actual: Mapping[str, str]) -> str | None:
  """One sentence naming how `actual` differs from the signed `expected` digests, or None."""
  changed = sorted(n for n in expected if n in actual and actual[n] != expected[n])
  missing = sorted(n for n in expected if n not in actual)
  extra = sorted(n for n in actual if n not in expected)
  problems = []
  swapped = set()
  for i, a in enumerate(changed):
    for b in changed[i + 1:]:
      if a not in swapped and b not in swapped and actual[a] == expected[b] \
          and actual[b] == expected[a]:
        swapped |= {a, b}
        problems.append(f"files {a!r} and {b!r} hold each other's signed contents (swapped)")
  for name in changed:
    if name not in swapped:
      problems.append(f"hash mismatch for {name!r}: signed sha256 {_short(expected[name])}, "
                      f"found {_short(actual[name])}")
  problems += [f"missing file {n!r} (in the signed manifest, not on disk)" for n in missing]
  problems += [f"unexpected file {n!r} (not in the signed manifest)" for n in extra]
  if not problems:
    return None
  more = f" (and {len(problems) - 3} more differences)" if len(problems) > 3 else ""
  return "; ".join(problems[:3]) + more


# --------------------------------------------------------------------------- sign / verify


def _model_signing():
  # Imported when a signature is made or checked: half a second of imports
  # (sigstore) that runs without signing never pay.
  import model_signing  # pylint: disable=g-import-not-at-top
  import model_signing.hashing  # pylint: disable=g-import-not-at-top,unused-import
  import model_signing.signing  # pylint: disable=g-import-not-at-top,unused-import
  import model_signing.verifying  # pylint: disable=g-import-not-at-top,unused-import
  return model_signing


def _hashing_config():
  ms = _model_signing()
  return ms.hashing.Config().use_file_serialization(
      hashing_algorithm=_HASHING["hash_type"]).set_ignored_paths(
          paths=[SIGNATURE_FILE], ignore_git_paths=False)


def _read_signature(path: str, label: str) -> tuple[dict, dict]:
  """(bundle, in-toto statement) of a signature file, not yet verified."""
  try:
    with open(path) as f:
      bundle = json.load(f)
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"], validate=True))
    # The fields read later, so that a mangled statement fails here, once.
    _ = str(statement["subject"][0]["name"]), _signed_digests(statement)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointVerificationError(
        f"{label}: {SIGNATURE_FILE} is not a readable signature bundle "
        f"({type(e).__name__}: {str(e)[:200]}); it was edited or corrupted.") from None
  return bundle, statement


def _signed_digests(statement: dict) -> dict[str, str]:
  return {str(r["name"]): str(r["digest"]) for r in statement["predicate"]["resources"]}


def _key_hint(bundle: dict) -> str | None:
  material = bundle.get("verificationMaterial") or {}
  return (material.get("publicKey") or {}).get("hint") or None


def sign_directory(directory: str, policy: SigningPolicy) -> dict[str, Any]:
  """Signs every file of `directory` with the policy's key into `directory/certjax.sig`.

  The signature is written to a temporary file beside the directory and
  renamed into it, so that the manifest never lists it and a reader never
  sees half a signature.

  Returns:
    The record provenance keeps: key fingerprint, content sha256, file count.

  Raises:
    ValueError: the policy has no signing key.
  """
  if not policy.key:
    raise ValueError("No signing key: set signing.key or $CERTJAX_SIGNING_KEY.")
  ms = _model_signing()
  directory = os.path.abspath(directory)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(directory)}.{SIGNATURE_FILE}.",
                             suffix=".tmp", dir=os.path.dirname(directory))
  os.close(fd)
  try:
    ms.signing.Config().set_hashing_config(_hashing_config()).use_elliptic_key_signer(
        private_key=policy.key, password=policy.password).sign(directory, tmp)
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, SIGNATURE_FILE))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  _, statement = _read_signature(os.path.join(directory, SIGNATURE_FILE), directory)
  digests = _signed_digests(statement)
  return {"signed": True, "key_fingerprint": policy.key_fingerprint,
          "sha256": content_sha256(digests), "files": len(digests)}


def verify_directory(directory: str, policy: SigningPolicy, *, expected_name: str,
                     label: str) -> dict[str, Any]:
  """Checks `directory` against its signature under `policy` (see the module docstring).

  Args:
    directory: the step directory.
    policy: trusted keys and whether a signature is required.
    expected_name: the subject the statement must name (the step, e.g. '200').
    label: how errors name the directory ('checkpoint step 200 in ...').

  Returns:
    A JSON-serialisable record: signed, verified, key_fingerprint, sha256 (of
    the contents, `content_sha256`), files.

  Raises:
    CheckpointVerificationError: one line naming the first problems.
  """
  signature = os.path.join(directory, SIGNATURE_FILE)
  if not os.path.exists(signature):
    if policy.require:
      raise CheckpointVerificationError(
          f"{label}: not signed (no {SIGNATURE_FILE}), and unsigned checkpoints are refused "
          f"(signing.require or ${ENV_REQUIRE}). If you know where it came from, sign it: "
          "python -m launch.sign sign --workdir=... --key=...")
    digests = _digests_or_error(directory, label)
    return {"signed": False, "verified": False, "key_fingerprint": None,
            "sha256": content_sha256(digests), "files": len(digests)}
  bundle, statement = _read_signature(signature, label)
  hint = _key_hint(bundle)
  candidates = [k for k in policy.trusted if hint is None or k.fingerprint == hint]
  if not candidates:
    if policy.trusted or policy.require:
      trusted = ", ".join(sorted(_short(k.fingerprint) for k in policy.trusted)) or "none"
      raise CheckpointVerificationError(
          f"{label}: signed by key {_short(hint or '?')}, which is not a trusted key "
          f"(trusted: {trusted}). Trust it only if you trust who made it: python -m "
          "launch.sign trust --public_key=<their .pub>.")
    # Nothing to check the signature against: the hashes still catch
    # corruption, but not a forger, who could re-sign. Said so.
    _check_contents(directory, statement, expected_name, label)
    logging.warning("%s is signed by key %s, but no trusted key is configured: checked its file "
                    "hashes only, not who signed it (set signing.trusted_keys, $%s or python -m "
                    "launch.sign trust).", label, _short(hint or "?"), ENV_TRUSTED)
    digests = _signed_digests(statement)
    return {"signed": True, "verified": False, "key_fingerprint": hint,
            "sha256": content_sha256(digests), "files": len(digests)}
  from cryptography import exceptions as crypto_exceptions  # pylint: disable=g-import-not-at-top
  ms = _model_signing()
  for key in candidates:
    try:
      # model-signing prints a note to stdout for bundles without a key hint;
      # the outcome is what counts, and it is reported below.
      with contextlib.redirect_stdout(io.StringIO()):
        ms.verifying.Config().use_elliptic_key_verifier(public_key=key.path).set_hashing_config(
            _hashing_config()).verify(directory, signature)
    except crypto_exceptions.InvalidSignature:
      continue
    except ValueError as e:
      if str(e).startswith("Key mismatch"):
        continue
      # The signature verified and the files differ from its manifest: name them.
      _check_contents(directory, statement, expected_name, label)
      raise CheckpointVerificationError(f"{label}: {str(e)[:500]}") from None
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointVerificationError(
          f"{label}: could not be verified ({type(e).__name__}: {str(e)[:300]}).") from None
    # model-signing hashed the directory and found what was signed.
    _check_name(statement, expected_name, label)
    digests = _signed_digests(statement)
    return {"signed": True, "verified": True, "key_fingerprint": key.fingerprint,
            "sha256": content_sha256(digests), "files": len(digests)}
  raise CheckpointVerificationError(
      f"{label}: the signature in {SIGNATURE_FILE} does not verify with trusted key "
      f"{', '.join(_short(k.fingerprint) for k in candidates)}: the signed manifest or the "
      "signature was edited.")


def _digests_or_error(directory: str, label: str) -> dict[str, str]:
  try:
    return file_digests(directory)
  except CheckpointVerificationError as e:
    raise CheckpointVerificationError(f"{label}: {e}") from None


def _check_name(statement: dict, expected_name: str, label: str) -> None:
  name = str(statement["subject"][0]["name"])
  if name != expected_name:
    raise CheckpointVerificationError(
        f"{label}: signed as step {name}, found as step {expected_name}: a step directory was "
        "copied, renamed or swapped.")


def _check_contents(directory: str, statement: dict, expected_name: str, label: str) -> None:
  problem = describe_differences(_signed_digests(statement), _digests_or_error(directory, label))
  if problem:
    raise CheckpointVerificationError(
        f"{label}: {problem}; the checkpoint changed after it was signed (restore it from a "
        "trusted copy).")
  _check_name(statement, expected_name, label)
