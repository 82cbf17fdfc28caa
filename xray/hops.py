"""One upstream proxy (`Hop`) and the rules its credentials follow, in one copy.

A `Hop` is what a Proxy row holds (credentials decrypted), what a share link describes
(`xray.links`) and one hop of a sidecar's chain (`xray.config`). The credential rules are
the ones the domain service checks on save (`server.proxies`) and the config generator
checks again on build: each protocol takes a username or not, needs a password or a UUID.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_CHAIN_HOPS = 8
PROTOCOLS = ("http", "https", "socks5", "shadowsocks", "vmess", "vless", "trojan")
# http/https/socks5 authenticate with an optional user:password; the others carry one secret
# in `password` (a UUID for VMess and VLESS) and no username.
USERNAME_PROTOCOLS = frozenset({"http", "https", "socks5"})
PASSWORD_REQUIRED = frozenset({"shadowsocks", "vmess", "vless", "trojan"})
UUID_PROTOCOLS = frozenset({"vmess", "vless"})
SHADOWSOCKS_METHODS = frozenset(
    {
        "aes-128-gcm",
        "aes-256-gcm",
        "chacha20-poly1305",
        "chacha20-ietf-poly1305",
        "xchacha20-poly1305",
        "xchacha20-ietf-poly1305",
        "2022-blake3-aes-128-gcm",
        "2022-blake3-aes-256-gcm",
        "2022-blake3-chacha20-poly1305",
        "none",
        "plain",
    }
)


@dataclass(frozen=True)
class Hop:
    """One upstream proxy, with its credentials decrypted."""

    name: str
    protocol: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)


# A proxy read from a share link is a Hop like any other.
ParsedProxy = Hop


@dataclass(frozen=True)
class CredentialProblem:
    """What is wrong with a proxy's credentials: on `field` (`username` or `password`),
    `missing` when something required is absent (else it is invalid). The message quotes
    no credential."""

    field: str
    message: str
    missing: bool = False


def credential_problems(
    protocol: str, username: str | None, password: str | None
) -> list[CredentialProblem]:
    """Every way `username`/`password` break the rules of `protocol` (empty when they don't)."""
    problems: list[CredentialProblem] = []
    if username and protocol not in USERNAME_PROTOCOLS:
        problems.append(CredentialProblem("username", f"{protocol} proxies take no username"))
    if protocol in PASSWORD_REQUIRED and not password:
        what = "a UUID" if protocol in UUID_PROTOCOLS else "a password"
        message = f"{protocol} needs {what} in password"
        problems.append(CredentialProblem("password", message, missing=True))
    elif protocol in UUID_PROTOCOLS and password and not is_uuid(password):
        problems.append(CredentialProblem("password", f"{protocol} needs a UUID in password"))
    if protocol in USERNAME_PROTOCOLS and password and not username:
        message = f"{protocol} credentials need a username with the password"
        problems.append(CredentialProblem("username", message, missing=True))
    return problems


def is_uuid(value: str) -> bool:
    """Whether `value` reads as a UUID (any of the forms `uuid.UUID` takes)."""
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def shadowsocks_method(value: Any) -> str | None:
    """The Shadowsocks cipher `value` names, lower-cased; None when it is not one we run."""
    if not isinstance(value, str):
        return None
    method = value.strip().lower()
    return method if method in SHADOWSOCKS_METHODS else None


def shadowsocks_method_problem() -> str:
    """What to say about a missing or unknown Shadowsocks method."""
    return "shadowsocks needs settings.method, one of " + ", ".join(sorted(SHADOWSOCKS_METHODS))
