"""The site key pair (ed25519, through ``cryptography``): signs bundle manifests and audit heads.

The private key lives outside every bundle and repository, by default
``~/.config/gate/site.key`` (``$GATE_KEY_DIR`` moves the folder), mode 0600; the public key
beside it (``site.pub``, PEM) is what verifiers are given (``--public-key FILE``). ``gate keys
init`` makes the pair; :func:`load_or_create_signing_key` makes a demo pair on first use (the
caller announces it) so a fresh machine can run the README's commands.

A signature file is JSON: ``{"alg": "ed25519", "key_id": <sha256 of the raw public key>,
"signature": <hex>}`` over the exact bytes signed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gate.errors import IntegrityError, UsageError

PRIVATE_KEY_FILE = "site.key"
PUBLIC_KEY_FILE = "site.pub"
PRIVATE_KEY_MODE = 0o600
"""Owner read/write only: the private key is a secret of the site."""


def key_dir() -> Path:
    """``$GATE_KEY_DIR``, else ``$XDG_CONFIG_HOME/gate``, else ``~/.config/gate``."""
    if os.environ.get("GATE_KEY_DIR"):
        return Path(os.environ["GATE_KEY_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "gate"


def key_id(public: Ed25519PublicKey) -> str:
    """sha256 (hex) of the raw 32-byte public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_pem(public: Ed25519PublicKey) -> bytes:
    """The public key as PEM (SubjectPublicKeyInfo)."""
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _inside_repo(folder: Path) -> bool:
    here = folder.resolve()
    return any((p / ".git").exists() for p in (here, *here.parents))


def init_keys(folder: Path, force: bool = False) -> tuple[Path, Path]:
    """Write a fresh key pair into ``folder``: private key mode 0600, public key PEM.

    Raises:
        UsageError: a key exists (and not ``force``), or ``folder`` is inside a git repository.

    """
    folder = Path(folder)
    private, public = folder / PRIVATE_KEY_FILE, folder / PUBLIC_KEY_FILE
    if _inside_repo(folder):
        raise UsageError(
            f"{folder}: inside a git repository; keep the site key outside (default {key_dir()})"
        )
    if private.exists() and not force:
        raise UsageError(f"{private}: a site key exists; give --force to replace it")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = private.with_name(private.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_KEY_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(tmp, PRIVATE_KEY_MODE)
    os.replace(tmp, private)
    public.write_bytes(public_pem(key.public_key()))
    return private, public


@dataclass(frozen=True)
class SigningKey:
    """A loaded private key and where it came from."""

    key: Ed25519PrivateKey
    path: Path
    created: bool

    def sign(self, data: bytes) -> bytes:
        """The signature file's bytes (JSON) for ``data``."""
        sig = self.key.sign(data)
        doc = {"alg": "ed25519", "key_id": key_id(self.key.public_key()), "signature": sig.hex()}
        return (json.dumps(doc, sort_keys=True) + "\n").encode("ascii")


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read a private key (PEM, PKCS8).

    Raises:
        IntegrityError: unreadable, not ed25519, or readable by others than its owner.

    """
    try:
        mode = path.stat().st_mode & 0o777
        data = path.read_bytes()
    except OSError as err:
        raise IntegrityError(f"{path}: site key unreadable ({err.strerror}); run gate keys init") from err
    if mode & 0o077:
        raise IntegrityError(f"{path}: site key mode {mode:o}; expected 600 (chmod 600 {path})")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as err:
        raise IntegrityError(f"{path}: not a PEM private key") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise IntegrityError(f"{path}: not an ed25519 key")
    return key


def load_or_create_signing_key(folder: Path | None = None) -> SigningKey:
    """The site key of ``folder`` (default :func:`key_dir`), made on first use (``created``)."""
    folder = key_dir() if folder is None else Path(folder)
    private = folder / PRIVATE_KEY_FILE
    created = False
    if not private.exists():
        init_keys(folder)
        created = True
    return SigningKey(load_signing_key(private), private, created)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a public key (PEM).

    Raises:
        UsageError: unreadable or not an ed25519 public key.

    """
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: not a readable PEM public key") from err
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"{path}: not an ed25519 public key")
    return key


def signature_problem(data: bytes, signature_file: Path, public: Ed25519PublicKey) -> str | None:
    """Why ``signature_file`` is not a valid signature of ``data`` by ``public`` (None: valid)."""
    if signature_file.is_symlink() or not signature_file.is_file():
        return f"{signature_file.name}: no signature (the bundle is unsigned)"
    try:
        doc = json.loads(signature_file.read_bytes()[:4096])
        sig = bytes.fromhex(doc["signature"])
        kid = doc["key_id"]
        alg = doc["alg"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{signature_file.name}: unreadable signature file"
    if alg != "ed25519":
        return f"{signature_file.name}: algorithm {alg!r}, expected ed25519"
    if kid != key_id(public):
        given = key_id(public)[:12]
        return f"{signature_file.name}: signed by key {str(kid)[:12]}…, not by the given key {given}…"
    try:
        public.verify(sig, data)
    except InvalidSignature:
        return f"{signature_file.name}: signature does not match (signed content was changed)"
    return None
