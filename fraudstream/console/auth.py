"""Who may do what in the console: a users file with scrypt password hashes and roles, HTTP Basic.

    [users.alice]
    password = "scrypt$16384$8$1$<salt hex>$<hash hex>"   # `fraudstream console --hash-password` prints one
    roles = ["analyst"]                                    # analyst: verdicts; rules_admin: rule changes

Anonymous requests are allowed only from the loopback interface (a console on 127.0.0.1 is a single
person's). There, without a users file, the anonymous user has every role and gives verdicts under the
name they type (remembered in a cookie); with a users file, an anonymous loopback user may look and give
verdicts, and changing rules needs a rules_admin login. From any other address every request needs a
valid login. Every verdict and change names its author.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fraudstream.errors import ConfigError

ANALYST = "analyst"
RULES_ADMIN = "rules_admin"
ROLES = (ANALYST, RULES_ADMIN)
# scrypt's parameters: RFC 7914's interactive-login example (16 MiB, well under a tenth of a second).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 16384, 8, 1


@dataclass(frozen=True, slots=True)
class User:
    name: str
    roles: frozenset[str]
    anonymous: bool = False

    def may(self, role: str) -> bool:
        return role in self.roles


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(
            password.encode(),
            salt=bytes.fromhex(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(digest) // 2,
            maxmem=2**26,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), digest)


@dataclass(frozen=True, slots=True)
class Users:
    """The users file, read once at start."""

    hashes: dict[str, str]
    roles: dict[str, frozenset[str]]

    @classmethod
    def load(cls, path: Path) -> Users:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"users file {path}: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"users file {path}: not valid TOML: {exc}") from exc
        hashes, roles = {}, {}
        for name, entry in (data.get("users") or {}).items():
            if not isinstance(entry, dict) or not isinstance(entry.get("password"), str):
                raise ConfigError(f"users file {path}: users.{name} needs a password (a hash from --hash-password)")
            given = entry.get("roles", [])
            unknown = set(given) - set(ROLES) if isinstance(given, list) else {"(not a list)"}
            if unknown:
                raise ConfigError(
                    f"users file {path}: users.{name}.roles: unknown {sorted(unknown)}; known: {', '.join(ROLES)}"
                )
            if not entry["password"].startswith("scrypt$"):
                raise ConfigError(
                    f"users file {path}: users.{name}.password is not a scrypt hash "
                    "(never a clear password: use `fraudstream console --hash-password`)"
                )
            hashes[name], roles[name] = entry["password"], frozenset(given)
        if not hashes:
            raise ConfigError(f"users file {path}: no [users.NAME] entry")
        return cls(hashes, roles)

    def authenticate(self, name: str, password: str) -> User | None:
        stored = self.hashes.get(name)
        if stored is None:
            check_password(password, hash_password("x"))  # as slow as a known name: no user enumeration by timing
            return None
        return User(name, self.roles[name]) if check_password(password, stored) else None


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(user, password) from an `Authorization: Basic ...` header, None if absent or not Basic."""
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user, password


class Authenticator:
    def __init__(self, users: Users | None, *, anonymous_name: str) -> None:
        self.users = users
        self.anonymous_name = anonymous_name
        # A browser sends Basic credentials with every request: scrypt once per (user, password) seen.
        self._checked: dict[tuple[str, bytes], User] = {}

    def user_for(self, client_host: str | None, authorization: str | None) -> User | None:
        """The request's user; None: refuse (401)."""
        credentials = basic_credentials(authorization)
        if credentials is not None:
            if self.users is None:
                return None
            key = (credentials[0], hashlib.sha256(credentials[1].encode()).digest())
            if key not in self._checked:
                user = self.users.authenticate(*credentials)
                if user is None:
                    return None
                self._checked[key] = user
            return self._checked[key]
        if not is_loopback(client_host):
            return None
        roles = frozenset([ANALYST]) if self.users else frozenset(ROLES)
        return User(self.anonymous_name, roles, anonymous=True)
