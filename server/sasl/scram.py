"""SCRAM (RFC 5802) with SHA-1 and SHA-256 (RFC 7677), sans-IO.

Only salted keys are stored, so a database leak does not reveal passwords and
the server can still verify PLAIN. Unknown accounts get a deterministic fake
salt so the exchange looks identical until the final proof check.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

import precis_i18n

from . import SaslFailure

__all__ = [
    "DEFAULT_ITERATIONS",
    "HASHES",
    "MECHANISMS",
    "ScramClient",
    "ScramCredentials",
    "ScramServer",
    "credentials_from_salted",
    "derive_credentials",
    "downgrade_hash",
    "verify_password",
]

HASHES = ("SHA-1", "SHA-256")
MECHANISMS = ("SCRAM-SHA-1", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS")
DEFAULT_ITERATIONS = 4096
_SALT_LENGTH = 16
_HASHLIB_NAMES = {"SHA-1": "sha1", "SHA-256": "sha256"}

_CB_NAME = re.compile(r"[A-Za-z0-9.\-]+")
_ATTR = re.compile(r"[A-Za-z]")
_PRINTABLE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")  # RFC 5802 'printable': no ','
_ESCAPE = re.compile(r"=(2C|3D|.{0,2})")


@dataclass(frozen=True)
class ScramCredentials:
    """What the server stores for one account and one hash: nothing reversible."""

    hash_name: str  # 'SHA-1' or 'SHA-256'
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


def _hashlib_name(hash_name: str) -> str:
    try:
        return _HASHLIB_NAMES[hash_name]
    except KeyError:
        raise ValueError(f"unsupported SCRAM hash: {hash_name!r}") from None


def _prepare_password(password: str) -> bytes:
    """PRECIS OpaqueString (RFC 8265 §4.2), as RFC 7677 asks of new deployments."""
    try:
        prepared = precis_i18n.get_profile("OpaqueString").enforce(password)
    except UnicodeEncodeError as exc:
        raise ValueError(f"invalid password: {exc.reason}") from None
    return prepared.encode("utf-8")


def _hmac(key: bytes, msg: bytes, algo: str) -> bytes:
    return hmac.new(key, msg, algo).digest()


def _salted_keys(salted_password: bytes, algo: str) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey) from SaltedPassword."""
    client_key = _hmac(salted_password, b"Client Key", algo)
    stored_key = hashlib.new(algo, client_key).digest()
    server_key = _hmac(salted_password, b"Server Key", algo)
    return client_key, stored_key, server_key


def derive_credentials(
    password: str, hash_name: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
) -> ScramCredentials:
    """Derive the storable SCRAM keys for a password (ValueError if it is invalid)."""
    algo = _hashlib_name(hash_name)
    if iterations < 1:
        raise ValueError("iterations must be positive")
    if salt is None:
        salt = os.urandom(_SALT_LENGTH)
    if not salt:
        raise ValueError("salt must not be empty")
    salted = hashlib.pbkdf2_hmac(algo, _prepare_password(password), salt, iterations)
    _, stored_key, server_key = _salted_keys(salted, algo)
    return ScramCredentials(hash_name, salt, iterations, stored_key, server_key)


def credentials_from_salted(hash_name: str, salt: bytes, iterations: int, salted: bytes) -> ScramCredentials:
    """The storable keys from a SaltedPassword a client computed (XEP-0480's upgrade of an account's hash)."""
    algo = _hashlib_name(hash_name)
    if len(salted) != hashlib.new(algo).digest_size:
        raise ValueError(f"a {hash_name} SaltedPassword has {hashlib.new(algo).digest_size} bytes")
    _, stored_key, server_key = _salted_keys(salted, algo)
    return ScramCredentials(hash_name, salt, iterations, stored_key, server_key)


def verify_password(creds: ScramCredentials, password: str) -> bool:
    """Check a plaintext password (SASL PLAIN) against stored SCRAM keys."""
    try:
        candidate = derive_credentials(password, creds.hash_name, creds.salt, creds.iterations)
    except ValueError:
        return False
    return hmac.compare_digest(candidate.stored_key, creds.stored_key)


def _b64decode(value: str) -> bytes:
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise SaslFailure("malformed-request", "invalid base64") from None


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _decode_utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslFailure("malformed-request", "message is not valid UTF-8") from None


def _unescape_saslname(value: str) -> str:
    """Decode RFC 5802 saslname: only =2C and =3D are valid escapes."""
    if not value or "," in value or "\x00" in value:
        raise SaslFailure("malformed-request", "invalid saslname")

    def replace(match: re.Match[str]) -> str:
        code = match.group(1)
        if code == "2C":
            return ","
        if code == "3D":
            return "="
        raise SaslFailure("malformed-request", "invalid escape in saslname")

    return _ESCAPE.sub(replace, value)


def _escape_saslname(value: str) -> str:
    return value.replace("=", "=3D").replace(",", "=2C")


def _attribute(part: str, name: str) -> str:
    """Value of 'name=value', failing if the attribute name differs."""
    if not part.startswith(name + "="):
        raise SaslFailure("malformed-request", f"expected attribute {name!r}")
    return part[len(name) + 1 :]


def _check_extensions(parts: list[str]) -> None:
    """Optional extensions are ignored, but must be well-formed attr=value pairs."""
    for part in parts:
        if len(part) < 2 or part[1] != "=" or not _ATTR.fullmatch(part[0]):
            raise SaslFailure("malformed-request", "invalid extension attribute")
        if part[0] == "m":
            raise SaslFailure("malformed-request", "mandatory extensions are not supported")


def _check_nonce(nonce: str) -> str:
    if not _PRINTABLE.fullmatch(nonce):
        raise SaslFailure("malformed-request", "invalid nonce")
    return nonce


def _mechanism_hash(mechanism: str) -> tuple[str, bool]:
    """('SHA-1' | 'SHA-256', is_plus) for a SCRAM mechanism name."""
    if mechanism not in MECHANISMS:
        raise SaslFailure("invalid-mechanism", f"unsupported mechanism {mechanism!r}")
    plus = mechanism.endswith("-PLUS")
    return mechanism.removeprefix("SCRAM-").removesuffix("-PLUS"), plus


def downgrade_hash(hash_name: str, mechanisms: list[str], cb_types: list[str]) -> str:
    """XEP-0474's 'h' attribute: the hash of what the server offered, so that a client can tell whether the
    lists it saw were stripped on the way. The mechanisms sorted by octet and joined by U+001E, then, when
    channel-binding types were offered (XEP-0440), U+001F and those types sorted and joined the same way."""
    offered = "\x1e".join(sorted(mechanisms))
    if cb_types:
        offered += "\x1f" + "\x1e".join(sorted(cb_types))
    return _b64encode(hashlib.new(_hashlib_name(hash_name), offered.encode()).digest())


def _new_nonce() -> str:
    return _b64encode(os.urandom(18))


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


class ScramServer:
    """One server-side SCRAM exchange: start() -> challenge() -> finish()."""

    def __init__(
        self,
        mechanism: str,
        channel_bindings: dict[str, bytes],
        plus_advertised: bool,
        secret: bytes,
        server_nonce: str | None = None,
        offered: tuple[list[str], list[str]] | None = None,
    ) -> None:
        self.mechanism = mechanism
        self._offered = offered  # (mechanisms, channel-binding types) for XEP-0474
        self.hash_name, self._plus = _mechanism_hash(mechanism)
        self._algo = _hashlib_name(self.hash_name)
        self._channel_bindings = dict(channel_bindings)
        self._plus_advertised = plus_advertised
        self._secret = secret
        self._server_nonce = _new_nonce() if server_nonce is None else _check_nonce(server_nonce)
        self.authzid: str | None = None
        #: The channel-binding type the client used (-PLUS only).
        self.cb_type: str | None = None
        self._username: str | None = None
        self._state = "start"
        self._gs2_header = b""
        self._client_first_bare = ""
        self._nonce = ""
        self._server_first = ""
        self._creds: ScramCredentials | None = None
        self._fake = False

    @property
    def username(self) -> str:
        """The authcid from client-first-message (only valid after start())."""
        if self._username is None:
            raise SaslFailure("malformed-request", "exchange not started")
        return self._username

    def _advance(self, expected: str, following: str) -> None:
        if self._state != expected:
            self._state = "failed"
            raise SaslFailure("malformed-request", "SCRAM step out of order")
        self._state = following

    def start(self, client_first: bytes) -> str:
        """Parse client-first-message; return the username (authcid)."""
        self._advance("start", "failed")
        message = _decode_utf8(client_first)
        parts = message.split(",")
        if len(parts) < 4:
            raise SaslFailure("malformed-request", "truncated client-first-message")
        flag, authzid = parts[0], parts[1]
        self._check_cbind_flag(flag)
        if authzid:
            self.authzid = _unescape_saslname(_attribute(authzid, "a"))
        self._gs2_header = f"{flag},{authzid},".encode()
        bare = parts[2:]
        if bare[0].startswith("m="):
            raise SaslFailure("malformed-request", "mandatory extensions are not supported")
        username = _unescape_saslname(_attribute(bare[0], "n"))
        self._nonce = _check_nonce(_attribute(bare[1], "r"))
        _check_extensions(bare[2:])
        self._client_first_bare = ",".join(bare)
        self._username = username
        self._state = "challenge"
        return username

    def _check_cbind_flag(self, flag: str) -> None:
        if flag.startswith("p="):
            cb_name = flag[2:]
            if not _CB_NAME.fullmatch(cb_name):
                raise SaslFailure("malformed-request", "invalid channel-binding name")
            if not self._plus:
                raise SaslFailure("malformed-request", "channel binding requested with a non-PLUS mechanism")
            if cb_name not in self._channel_bindings:
                raise SaslFailure("malformed-request", "unsupported-channel-binding-type")
            self.cb_type = cb_name
        elif flag in ("n", "y"):
            if self._plus:
                raise SaslFailure("malformed-request", "PLUS mechanism requires channel binding")
            if flag == "y" and self._plus_advertised:
                # The client supports binding but did not see -PLUS: the list was tampered with.
                raise SaslFailure("not-authorized", "server-does-support-channel-binding")
        else:
            raise SaslFailure("malformed-request", "invalid gs2 channel-binding flag")

    def _fake_credentials(self, username: str) -> ScramCredentials:
        """Stable per-user salt and unusable keys, indistinguishable on the wire.

        The name is case-mapped like an XMPP localpart (RFC 7622), so 'Ghost'
        and 'ghost' get the same fake salt just as they would share a real one.
        """
        # A name PRECIS rejects matches no account; its raw form is as stable a key.
        with contextlib.suppress(UnicodeEncodeError):
            username = precis_i18n.get_profile("UsernameCaseMapped").enforce(username)
        seed = _hmac(self._secret, f"{self.hash_name}\x00{username}".encode(), "sha256")
        size = hashlib.new(self._algo).digest_size
        keys = _hmac(self._secret, b"fake-keys\x00" + seed, "sha512")
        return ScramCredentials(
            self.hash_name, seed[:_SALT_LENGTH], DEFAULT_ITERATIONS, keys[:size], keys[size : 2 * size]
        )

    def challenge(self, creds: ScramCredentials | None) -> bytes:
        """Build server-first-message; pass None for unknown or disabled accounts."""
        self._advance("challenge", "failed")
        if creds is None:
            creds = self._fake_credentials(self.username)
            self._fake = True
        elif creds.hash_name != self.hash_name:
            raise ValueError(f"credentials are {creds.hash_name}, mechanism needs {self.hash_name}")
        self._creds = creds
        self._nonce += self._server_nonce
        self._server_first = f"r={self._nonce},s={_b64encode(creds.salt)},i={creds.iterations}"
        if self._offered is not None:
            self._server_first += f",h={downgrade_hash(self.hash_name, *self._offered)}"
        self._state = "finish"
        return self._server_first.encode()

    def finish(self, client_final: bytes) -> bytes:
        """Verify client-final-message; return server-final-message (v=...)."""
        self._advance("finish", "failed")
        assert self._creds is not None
        message = _decode_utf8(client_final)
        parts = message.split(",")
        if len(parts) < 3:
            raise SaslFailure("malformed-request", "truncated client-final-message")
        cbind_input = _b64decode(_attribute(parts[0], "c"))
        nonce = _attribute(parts[1], "r")
        _check_extensions(parts[2:-1])
        proof = _b64decode(_attribute(parts[-1], "p"))
        expected_cbind = self._gs2_header
        if self.cb_type is not None:
            expected_cbind += self._channel_bindings[self.cb_type]
        if not hmac.compare_digest(cbind_input, expected_cbind):
            raise SaslFailure("not-authorized", "channel-bindings-dont-match")
        if not hmac.compare_digest(nonce.encode(), self._nonce.encode()):
            raise SaslFailure("not-authorized", "nonce mismatch")
        if len(proof) != len(self._creds.stored_key):
            raise SaslFailure("malformed-request", "invalid proof length")
        without_proof = message[: message.rindex(",p=")]
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        client_signature = _hmac(self._creds.stored_key, auth_message, self._algo)
        client_key = _xor(proof, client_signature)
        computed = hashlib.new(self._algo, client_key).digest()
        valid = hmac.compare_digest(computed, self._creds.stored_key)
        if not valid or self._fake:
            raise SaslFailure("not-authorized")
        server_signature = _hmac(self._creds.server_key, auth_message, self._algo)
        self._state = "done"
        return f"v={_b64encode(server_signature)}".encode()


class ScramClient:
    """Client side of SCRAM, for tests and benchmarks."""

    def __init__(
        self,
        mechanism: str,
        username: str,
        password: str,
        cb_type: str | None = None,
        cb_data: bytes = b"",
        plus_supported_by_server: bool = False,
        authzid: str | None = None,
        client_nonce: str | None = None,
    ) -> None:
        self.hash_name, plus = _mechanism_hash(mechanism)
        self._algo = _hashlib_name(self.hash_name)
        self._password = _prepare_password(password)
        if plus:
            if cb_type is None:
                raise ValueError("PLUS mechanisms need a channel-binding type")
            flag = f"p={cb_type}"
        else:
            # 'y': "I could bind, but you don't seem to offer -PLUS".
            flag = "y" if cb_type is not None and not plus_supported_by_server else "n"
            cb_data = b""
        authz = f"a={_escape_saslname(authzid)}" if authzid else ""
        self._gs2_header = f"{flag},{authz},".encode()
        self._cb_data = cb_data
        self._nonce = _new_nonce() if client_nonce is None else _check_nonce(client_nonce)
        self._first_bare = f"n={_escape_saslname(username)},r={self._nonce}"
        self._server_signature: bytes | None = None

    def first(self) -> bytes:
        """client-first-message."""
        return self._gs2_header + self._first_bare.encode()

    def final(self, server_first: bytes) -> bytes:
        """client-final-message for the given server-first-message."""
        text = _decode_utf8(server_first)
        parts = text.split(",")
        if len(parts) < 3:
            raise SaslFailure("malformed-request", "truncated server-first-message")
        nonce = _attribute(parts[0], "r")
        salt = _b64decode(_attribute(parts[1], "s"))
        iterations_text = _attribute(parts[2], "i")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise SaslFailure("not-authorized", "server nonce does not extend ours")
        if not iterations_text.isdigit() or int(iterations_text) < 1:
            raise SaslFailure("malformed-request", "invalid iteration count")
        salted = hashlib.pbkdf2_hmac(self._algo, self._password, salt, int(iterations_text))
        client_key, stored_key, server_key = _salted_keys(salted, self._algo)
        without_proof = f"c={_b64encode(self._gs2_header + self._cb_data)},r={nonce}"
        auth_message = f"{self._first_bare},{text},{without_proof}".encode()
        proof = _xor(client_key, _hmac(stored_key, auth_message, self._algo))
        self._server_signature = _hmac(server_key, auth_message, self._algo)
        return f"{without_proof},p={_b64encode(proof)}".encode()

    def verify(self, server_final: bytes) -> None:
        """Check the server signature; raises SaslFailure if the server is not genuine."""
        if self._server_signature is None:
            raise SaslFailure("malformed-request", "final() not called yet")
        text = _decode_utf8(server_final)
        if text.startswith("e="):
            raise SaslFailure("not-authorized", text[2:])
        signature = _b64decode(_attribute(text.split(",")[0], "v"))
        if not hmac.compare_digest(signature, self._server_signature):
            raise SaslFailure("not-authorized", "server signature mismatch")
