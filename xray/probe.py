"""A pre-flight probe of the hop a sidecar dials first: say what is wrong before Xray hides it.

Behind Xray/V2Ray every upstream failure looks the same to the client (an empty reply).
The probe speaks to the first hop itself: TCP (name resolution included), TLS when the hop
uses it, then for HTTP(S) and SOCKS5 hops the proxy handshake with the saved credentials
and a CONNECT to a harmless target (the next hop, or the check URL's host), and reports
one `Problem` kind: auth, refused, dns, tls, timeout, target (the upstream cannot reach the
target) or protocol (it does not speak what it should). Other protocols (Shadowsocks,
VMess, VLESS, Trojan) are checked up to TCP and TLS: their credentials cannot be tested
without their own handshake.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import socket
import ssl
import struct
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from xray.config import server_name
from xray.hops import Hop

ProblemKind = Literal["auth", "refused", "dns", "tls", "timeout", "target", "protocol"]
PROBE_TIMEOUT = 5.0
SOCKS_REPLIES = {
    1: "general failure",
    2: "not allowed by its rules",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}
UNREACHABLE_HTTP = (502, 503, 504)


@dataclass(frozen=True)
class Problem:
    """What the probe (or a sidecar line) found wrong, as a sentence naming the proxy."""

    kind: ProblemKind
    message: str


class ProbeFailed(Exception):
    def __init__(self, kind: ProblemKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def describe(kind: ProblemKind, hop: Hop, detail: str, target: str = "") -> str:
    """The sentence an admin reads for a problem `kind` with upstream proxy `hop`."""
    where = f"upstream proxy {hop.name!r} ({hop.host}:{hop.port})"
    sentences = {
        "auth": f"upstream proxy {hop.name!r} rejected the credentials ({detail})",
        "refused": f"{where} is unreachable: connection refused ({detail})",
        "dns": f"{where} is unreachable: the name {hop.host!r} does not resolve ({detail})",
        "tls": f"{where}: TLS failed ({detail})",
        "timeout": f"{where} did not answer in time ({detail})",
        "target": f"upstream proxy {hop.name!r} cannot reach {target} ({detail})",
        "protocol": f"{where} does not answer as a {hop.protocol} proxy ({detail})",
    }
    return sentences[kind]


def url_target(url: str) -> tuple[str, int]:
    """The host and port a URL names (the default port of its scheme when it names none)."""
    parts = urlsplit(url)
    default = 443 if parts.scheme == "https" else 80
    try:
        port = parts.port or default
    except ValueError:
        port = default
    return parts.hostname or "127.0.0.1", port


async def probe_hop(
    hop: Hop, target: tuple[str, int], *, label: str = "", timeout: float = PROBE_TIMEOUT
) -> Problem | None:
    """None when `hop` accepts us (and our CONNECT to `target`), else what went wrong.

    `label` names the target in a message (default: its host:port).
    """
    shown = label or f"{target[0]}:{target[1]}"
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _open(hop)
            try:
                if hop.protocol in ("http", "https"):
                    await _http_connect(reader, writer, hop, target)
                elif hop.protocol == "socks5":
                    await _socks5_connect(reader, writer, hop, target)
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
    except TimeoutError:
        return Problem("timeout", describe("timeout", hop, f"no answer within {timeout:g} s"))
    except ProbeFailed as exc:
        return Problem(exc.kind, describe(exc.kind, hop, exc.detail, shown))
    except OSError as exc:  # reset or closed by the peer mid-handshake
        reason = exc.strerror or type(exc).__name__
        detail = f"it closed the connection: {reason}"
        return Problem("protocol", describe("protocol", hop, detail))
    return None


async def _open(hop: Hop) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            hop.host, hop.port, type=socket.SOCK_STREAM
        )
    except socket.gaierror as exc:
        raise ProbeFailed("dns", exc.strerror or str(exc)) from None
    host = str(infos[0][4][0])
    try:
        reader, writer = await asyncio.open_connection(host, hop.port)
    except ConnectionRefusedError:
        raise ProbeFailed("refused", "nothing listens on that port") from None
    except OSError as exc:  # unreachable network or host, reset
        raise ProbeFailed("refused", exc.strerror or str(exc)) from None
    if _uses_tls(hop):
        try:
            await writer.start_tls(_tls_context(hop), server_hostname=_sni(hop))
        except (ssl.SSLError, ssl.CertificateError) as exc:
            writer.close()
            detail = getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
            raise ProbeFailed("tls", str(detail or exc)) from None
        except OSError as exc:  # reset or closed by the peer during the handshake
            writer.close()
            reason = exc.strerror or type(exc).__name__
            raise ProbeFailed(
                "tls", f"the connection was closed during the handshake: {reason}"
            ) from None
    return reader, writer


def _uses_tls(hop: Hop) -> bool:
    security = str(hop.settings.get("security") or "").lower()
    if security == "reality":  # not TLS a stock client can judge
        return False
    return security == "tls" or (not security and hop.protocol in ("https", "trojan"))


def _sni(hop: Hop) -> str | None:
    name = server_name(hop)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    return None


def _tls_context(hop: Hop) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if hop.settings.get("allowInsecure") is True:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def _http_connect(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hop: Hop, target: tuple[str, int]
) -> None:
    authority = f"[{target[0]}]:{target[1]}" if ":" in target[0] else f"{target[0]}:{target[1]}"
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    if hop.username is not None:
        token = base64.b64encode(f"{hop.username}:{hop.password or ''}".encode()).decode()
        head += f"Proxy-Authorization: Basic {token}\r\n"
    writer.write((head + "\r\n").encode())
    await writer.drain()
    status_line = await _read_line(reader)
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ProbeFailed("protocol", f"it answered {status_line[:60]!r}")
    code, reason = int(parts[1]), (parts[2] if len(parts) > 2 else "").strip()
    if code == 407:
        raise ProbeFailed("auth", f"407 {reason}".strip())
    if code in UNREACHABLE_HTTP:
        raise ProbeFailed("target", f"{code} {reason}".strip())


async def _read_line(reader: asyncio.StreamReader) -> str:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        raise ProbeFailed("protocol", "it closed the connection without an answer") from None
    except asyncio.LimitOverrunError:
        raise ProbeFailed("protocol", "its answer is not HTTP") from None
    return line.decode("latin-1").strip()


async def _socks5_connect(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hop: Hop, target: tuple[str, int]
) -> None:
    method = 2 if hop.username is not None else 0
    writer.write(bytes([5, 1, method]))
    chosen = await _read_exactly(reader, 2)
    if chosen[0] != 5:
        raise ProbeFailed("protocol", "it does not speak SOCKS5")
    if chosen[1] == 0xFF:
        wanted = "other credentials" if method == 2 else "credentials, and none are saved"
        raise ProbeFailed("auth", f"it wants {wanted}")
    if chosen[1] == 2:
        if hop.username is None:
            raise ProbeFailed("auth", "it wants credentials, and none are saved")
        user, password = hop.username.encode(), (hop.password or "").encode()
        writer.write(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
        status = await _read_exactly(reader, 2)
        if status[1] != 0:
            raise ProbeFailed("auth", "SOCKS5 user/password refused")
    host = target[0].encode("idna")
    writer.write(bytes([5, 1, 0, 3, len(host)]) + host + struct.pack(">H", target[1]))
    reply = await _read_exactly(reader, 2)
    if reply[1] != 0:
        raise ProbeFailed("target", f"SOCKS5 reply {reply[1]}: {SOCKS_REPLIES.get(reply[1], '?')}")


async def _read_exactly(reader: asyncio.StreamReader, count: int) -> bytes:
    try:
        return await reader.readexactly(count)
    except asyncio.IncompleteReadError:
        raise ProbeFailed("protocol", "it closed the connection mid-handshake") from None
