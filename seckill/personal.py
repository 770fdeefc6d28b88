"""Personal data on an order (the shipping address and phone): validated, sealed, revealed.

The gateway encrypts an address before the reserve script sees it, so Redis, the stream and the
database only ever hold ciphertext. A ciphertext names its cipher and key id
(``sm4gcm:<kid>:<base64url(nonce | ciphertext | tag)>``) and is bound to its order id by the
associated data: moved to another order, it does not decrypt. Keys come from
``SECKILL_DATA_KEYS`` = ``kid:base64key[,kid:base64key…]``: the first encrypts, all decrypt.

Nothing here puts a value of an address into an exception, a log line or a metric: error
messages name the field and the rule, never what was given.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from seckill.errors import InvalidRequest

log = logging.getLogger(__name__)

# setting value -> (name in a ciphertext, key length in bytes)
CIPHERS: Final = {"sm4-gcm": ("sm4gcm", 16), "aes-256-gcm": ("a256gcm", 32)}
_BY_TAG: Final = {tag: length for tag, length in CIPHERS.values()}
_KID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_NONCE = 12
_TAG = 16

ADDRESS_FIELDS: Final = ("name", "phone", "region", "detail")
_LONGEST: Final = {"name": 50, "phone": 16, "region": 100, "detail": 200}
# CN mobile, or E.164 (+, country code, up to 15 digits)
PHONE: Final = re.compile(r"1[3-9]\d{9}|\+[1-9]\d{6,14}")


class DataKeyError(ValueError):
    """SECKILL_DATA_KEYS (or the hash key, or the cipher) is unusable; the message says why."""


class DecryptError(Exception):
    """A ciphertext that does not open: unknown key id, wrong key, or moved to another order."""


@dataclass(frozen=True, slots=True)
class Address:
    name: str
    phone: str
    region: str
    detail: str

    def to_bytes(self) -> bytes:
        """The plaintext that is sealed."""
        return json.dumps(
            [self.name, self.phone, self.region, self.detail], ensure_ascii=False
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Address:
        name, phone, region, detail = json.loads(data)
        return cls(name, phone, region, detail)

    def normalised(self) -> str:
        """One spelling per address (width, case, spaces, phone prefix) for the keyed hash."""

        def norm(text: str) -> str:
            return " ".join(unicodedata.normalize("NFKC", text).casefold().split())

        phone = self.phone.removeprefix("+86") if self.phone.startswith("+861") else self.phone
        return "\x1f".join((norm(self.name), phone, norm(self.region), norm(self.detail)))

    def masked(self) -> dict[str, str]:
        """What the owner's order GET shows: the phone as ``138****1234``."""
        return {
            "name": self.name,
            "phone": mask_phone(self.phone),
            "region": self.region,
            "detail": self.detail,
        }

    def __repr__(self) -> str:  # a stray %r in a log line must not print personal data
        return "Address(<redacted>)"

    __str__ = __repr__


def mask_phone(phone: str) -> str:
    """All but the first digits and the last four hidden: ``13812341234`` -> ``138****1234``."""
    return phone[:-8] + "****" + phone[-4:]


def parse_address(value: Any) -> Address:
    """Validate an order POST's ``address``; InvalidRequest names the field, never its value."""
    if not isinstance(value, dict):
        raise InvalidRequest("address must be a JSON object")
    unknown = sorted(set(value) - set(ADDRESS_FIELDS))
    if unknown:
        raise InvalidRequest("address has an unknown field")
    for name in ADDRESS_FIELDS:
        if name not in value:
            raise InvalidRequest(f"missing field: address.{name}")
        text = value[name]
        if not isinstance(text, str) or not text.strip() or len(text) > _LONGEST[name]:
            raise InvalidRequest(
                f"address.{name} must be a non-empty string of at most {_LONGEST[name]} characters"
            )
        if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text):
            raise InvalidRequest(f"address.{name} must not contain control characters")
    if not PHONE.fullmatch(value["phone"]):
        raise InvalidRequest(
            "address.phone must be a mainland China mobile number (11 digits) or E.164 (+...)"
        )
    return Address(value["name"], value["phone"], value["region"], value["detail"])


def parse_keys(text: str) -> list[tuple[str, bytes]]:
    """``kid:base64key[,kid:base64key…]`` in order; DataKeyError on anything malformed."""
    parsed: list[tuple[str, bytes]] = []
    for n, item in enumerate(p.strip() for p in text.split(",")):
        if not item:
            continue
        kid, sep, encoded = item.partition(":")
        if not sep or not _KID.fullmatch(kid):
            raise DataKeyError(
                f"key #{n + 1} must be kid:base64key with kid 1-32 characters of [A-Za-z0-9_-]"
            )
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise DataKeyError(f"key {kid!r} is not valid base64") from None
        if len(key) not in _BY_TAG.values():
            raise DataKeyError(f"key {kid!r} is {len(key)} bytes: SM4 takes 16, AES-256 takes 32")
        if any(kid == k for k, _ in parsed):
            raise DataKeyError(f"key id {kid!r} is listed twice")
        parsed.append((kid, key))
    return parsed


def new_key(kid: str, cipher: str = "sm4-gcm") -> str:
    """A fresh random ``kid:base64key`` for ``cipher``."""
    if not _KID.fullmatch(kid):
        raise DataKeyError("key id must be 1-32 characters of [A-Za-z0-9_-]")
    return f"{kid}:{base64.b64encode(secrets.token_bytes(CIPHERS[cipher][1])).decode()}"


class Sealer:
    """Encrypts addresses under the first key, decrypts under any, and hashes them."""

    def __init__(self, keys_text: str, cipher: str = "sm4-gcm", hash_key: str = "") -> None:
        if cipher not in CIPHERS:
            raise DataKeyError(f"cipher must be one of {', '.join(CIPHERS)}, got {cipher!r}")
        keys = parse_keys(keys_text)
        if not keys:
            raise DataKeyError("no data key: set SECKILL_DATA_KEYS=kid:base64key")
        self._tag, length = CIPHERS[cipher]
        self.kid, self._key = keys[0]
        if len(self._key) != length:
            raise DataKeyError(
                f"the first key {self.kid!r} encrypts and must be {length} bytes for {cipher}"
            )
        self._keys: dict[str, bytes] = dict(keys)
        if hash_key:
            try:
                secret = base64.b64decode(hash_key, validate=True)
            except (binascii.Error, ValueError):
                raise DataKeyError("the data hash key is not valid base64") from None
            if len(secret) < 16:
                raise DataKeyError("the data hash key must be at least 16 bytes")
            self._hash_id, self._hash_key = "h", secret
        else:
            # derived from the encrypting key: a rotation re-hashes along with re-encrypting
            self._hash_id = self.kid
            self._hash_key = hmac.new(self._key, b"seckill address hash v1", "sha256").digest()
        self.prefix = f"{self._tag}:{self.kid}:"

    def key_ids(self) -> list[str]:
        """Every configured key id, the encrypting one first."""
        return list(self._keys)

    def seal(self, address: Address, order_id: str) -> str:
        """The address encrypted under the first key, bound to ``order_id``."""
        return self.seal_bytes(address.to_bytes(), order_id)

    def seal_bytes(self, plaintext: bytes, bound_to: str) -> str:
        nonce = os.urandom(_NONCE)
        sealed = _encrypt(self._tag, self._key, nonce, plaintext, _ad(bound_to))
        return self.prefix + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def open(self, token: str, order_id: str) -> Address:
        """The address ``token`` holds; DecryptError when it cannot be opened for ``order_id``."""
        try:
            return Address.from_bytes(self.open_bytes(token, order_id))
        except (ValueError, TypeError) as exc:
            raise DecryptError("the ciphertext does not hold an address") from exc

    def open_bytes(self, token: str, bound_to: str) -> bytes:
        tag, _, rest = token.partition(":")
        kid, _, body = rest.partition(":")
        key = self._keys.get(kid)
        if key is None:
            raise DecryptError(f"key id {kid!r} is not in SECKILL_DATA_KEYS")
        if _BY_TAG.get(tag) != len(key):
            raise DecryptError(f"key {kid!r} does not fit cipher {tag!r}")
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise DecryptError("malformed ciphertext") from None
        if len(raw) < _NONCE + _TAG:
            raise DecryptError("malformed ciphertext")
        try:
            return _decrypt(tag, key, raw[:_NONCE], raw[_NONCE:], _ad(bound_to))
        except InvalidTag:
            raise DecryptError(
                f"ciphertext does not open under key {kid!r} for this order"
            ) from None

    def hash(self, address: Address) -> str:
        """Keyed hash (HMAC-SHA256) of the normalised address: equal addresses, equal hashes."""
        digest = hmac.new(self._hash_key, address.normalised().encode(), hashlib.sha256)
        return f"{self._hash_id}:{digest.hexdigest()}"

    def reseal(self, token: str, order_id: str) -> tuple[str, str]:
        """(ciphertext under the first key, its hash) of the address ``token`` holds."""
        address = self.open(token, order_id)
        return self.seal(address, order_id), self.hash(address)

    def reveal(self, token: str, order_id: str) -> dict[str, str] | None:
        """The owner's view (phone masked), or None when it cannot be opened (logged)."""
        try:
            return self.open(token, order_id).masked()
        except DecryptError as exc:
            log.warning("address of order %s cannot be shown: %s", order_id, exc)
            return None


def _ad(bound_to: str) -> bytes:
    return b"seckill/order-address/" + bound_to.encode()


def _encrypt(tag: str, key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    if tag == "a256gcm":
        return AESGCM(key).encrypt(nonce, plaintext, ad)
    encryptor = Cipher(algorithms.SM4(key), modes.GCM(nonce)).encryptor()
    encryptor.authenticate_additional_data(ad)
    return encryptor.update(plaintext) + encryptor.finalize() + encryptor.tag


def _decrypt(tag: str, key: bytes, nonce: bytes, sealed: bytes, ad: bytes) -> bytes:
    if tag == "a256gcm":
        return AESGCM(key).decrypt(nonce, sealed, ad)
    body, mac = sealed[:-_TAG], sealed[-_TAG:]
    decryptor = Cipher(algorithms.SM4(key), modes.GCM(nonce, mac)).decryptor()
    decryptor.authenticate_additional_data(ad)
    return decryptor.update(body) + decryptor.finalize()


def settings_problem(keys_text: str, cipher: str, hash_key: str) -> tuple[str, str] | None:
    """(setting, why) when the data settings are unusable; None when fine or keys are unset."""
    if cipher not in CIPHERS:
        return "data.cipher", f"expected one of {', '.join(CIPHERS)}, got {cipher!r}"
    if not keys_text.strip():
        return None
    try:
        Sealer(keys_text, cipher, hash_key)
    except DataKeyError as exc:
        return ("data.hash_key" if "hash key" in str(exc) else "data.keys"), str(exc)
    return None


def dev_keys(var_dir: str, cipher: str = "sm4-gcm") -> str:
    """The development data key kept under var/ (made on first use), for `seckill up` only."""
    path = Path(var_dir) / "data.keys"
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = new_key("dev1", cipher)
    path.write_text(text + "\n", encoding="utf-8")
    path.chmod(0o600)
    return text


_PROBE = b"seckill data key probe"


def check_probes(sealer: Sealer, probes: Mapping[bytes, bytes]) -> tuple[dict[str, str], list[str]]:
    """(probes to add for new key ids, key ids whose stored probe this key does not open).

    Each key id leaves a probe in Redis the first time a gateway runs with it; a later start
    whose key under the same id does not open the probe has the wrong key, and stops.
    """
    wrong: list[str] = []
    stored = {k.decode(): v.decode() for k, v in probes.items()}
    for kid in sealer.key_ids():
        probe = stored.get(kid)
        if probe is None:
            continue
        try:
            if sealer.open_bytes(probe, "probe") != _PROBE:
                wrong.append(kid)
        except DecryptError:
            wrong.append(kid)
    new = {}
    if sealer.kid not in stored:
        new[sealer.kid] = sealer.seal_bytes(_PROBE, "probe")
    return new, wrong
