"""The Xray-compatible binary: which one, how to run and test a config, what it can do."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from xray.config import ConfigError, features_used, write_config
from xray.hops import Hop

Flavor = Literal["xray", "v2ray"]
VERSION_TIMEOUT = 10.0
VALIDATE_TIMEOUT = 20.0
NOT_FOUND = "no Xray-compatible binary: install xray or v2ray, or set CORRAL_XRAY_BIN"
VERSION_RE = re.compile(r"^(Xray|V2Ray)\s+v?(\d+(?:\.\d+)*)", re.MULTILINE)

# Features (see `xray.config.features_used`) that only Xray-core has. A ws/grpc/h2 hop
# dialed through another hop keeps its transport only with Xray's `transportLayer`
# (`dialerProxy`): V2Ray 4.34 keeps its TLS but silently drops the rest.
XRAY_ONLY = frozenset(
    {"reality", "xtls-flow", "xhttp", "shadowsocks-2022", "xchacha20", "chained-transport"}
)
# What to install for a feature this binary lacks (see `needs`).
FEATURE_NAMES = {
    "reality": "REALITY",
    "xtls-flow": "the XTLS Vision flow",
    "shadowsocks-2022": "a Shadowsocks 2022 cipher",
    "xchacha20": "an XChaCha20 cipher",
    "xhttp": "the XHTTP transport",
    "chained-transport": "a transport on a chained hop",
    "grpc": "the gRPC transport",
    "httpupgrade": "the HTTPUpgrade transport",
    "h2": "the HTTP/2 transport",
}
XRAY_SINCE = {"xhttp": "24.9.30"}  # the others: Xray-core 1.8 has them all
V2RAY_SINCE = {"grpc": "4.36", "httpupgrade": "5.10"}


class XrayBinaryError(RuntimeError):
    """No usable binary, or one that does not say what it is."""


@dataclass(frozen=True)
class XrayBinary:
    """An Xray-core or V2Ray executable and its version."""

    path: str
    flavor: Flavor
    version: tuple[int, ...] = ()

    @property
    def _v5_commands(self) -> bool:
        """V2Ray 5 has Xray-like subcommands (`run`, `test`); 4.x takes flags only."""
        return self.flavor == "v2ray" and self.version >= (5,)

    def run_args(self, config_path: Path | str) -> list[str]:
        """The full argv that runs the binary on `config_path`."""
        if self.flavor == "xray" or self._v5_commands:
            return [self.path, "run", "-c", str(config_path)]
        return [self.path, "-config", str(config_path)]

    def test_args(self, config_path: Path | str) -> list[str]:
        """The full argv that checks `config_path` and exits (0 when it is valid)."""
        if self.flavor == "xray":
            return [self.path, "run", "-test", "-c", str(config_path)]
        if self._v5_commands:
            return [self.path, "test", "-c", str(config_path)]
        return [self.path, "-test", "-config", str(config_path)]

    def supports(self, feature: str) -> bool:
        """Whether this binary handles a protocol or feature named by `features_used`."""
        if self.flavor == "xray":
            # Xray-core removed the HTTP/2 ("h2") transport in v24.12 in favour of xhttp.
            return not (feature == "h2" and self.version >= (24, 12))
        if feature in XRAY_ONLY:
            return False
        if feature == "grpc":
            return self.version >= (4, 36)
        if feature == "httpupgrade":
            return self.version >= (5, 10)
        return True

    def unsupported(self, features: Iterable[str]) -> list[str]:
        """The features this binary lacks, sorted (empty when it can run them all)."""
        return sorted(feature for feature in set(features) if not self.supports(feature))

    @property
    def label(self) -> str:
        """Flavor and version, e.g. `v2ray 4.34.0` (what `checkProxy` reports)."""
        return f"{self.flavor} {'.'.join(map(str, self.version)) or 'unknown version'}"

    def needs(self, feature: str) -> str:
        """Why this binary cannot run `feature` and what to install instead, in words."""
        what = FEATURE_NAMES.get(feature, feature)
        if feature == "h2" and self.flavor == "xray":
            wanted = "Xray-core before 24.12 or V2Ray"
        elif feature in XRAY_ONLY:
            wanted = f"Xray-core ≥ {XRAY_SINCE.get(feature, '1.8')}"
        else:
            wanted = f"V2Ray ≥ {V2RAY_SINCE.get(feature, '4')} or Xray-core"
        return (
            f"{what} needs {wanted}; this machine has {self.label} ({self.path}): install it "
            "and point CORRAL_XRAY_BIN at it"
        )

    def describe(self) -> str:
        version = ".".join(map(str, self.version)) or "unknown version"
        return f"{self.flavor} {version} ({self.path})"


def ensure_supported(binary: XrayBinary, chain: Sequence[Hop]) -> None:
    """Refuse (ConfigError) a chain that uses features the binary lacks.

    Call it before running a chain: V2Ray 4.x accepts a REALITY config and then sends
    VLESS in plaintext, and drops a chained hop's ws/grpc transport, without a word.
    """
    missing = binary.unsupported(features_used(chain))
    if missing:
        raise ConfigError(
            f"{binary.describe()} cannot run {', '.join(missing)}; install Xray-core "
            "(or point CORRAL_XRAY_BIN at it) for these proxies"
        )


def find_binary(setting: str | None) -> XrayBinary:
    """The binary named by CORRAL_XRAY_BIN (`setting`), else `xray`, else `v2ray` on PATH."""
    return inspect_binary(_locate(setting))


def installed_binary(setting: str | None) -> XrayBinary | None:
    """`find_binary`, asked once per executable file (path, size, mtime); None if none.

    Saving or importing proxies checks every one against it: 500 links must not start
    the binary 500 times.
    """
    try:
        path = _locate(setting)
        stat = os.stat(path)
        return _inspect_once(path, stat.st_size, stat.st_mtime_ns)
    except (OSError, XrayBinaryError):
        return None


@functools.lru_cache(maxsize=8)
def _inspect_once(path: str, _size: int, _mtime_ns: int) -> XrayBinary:
    return inspect_binary(path)


def _locate(setting: str | None) -> str:
    if setting:
        path = shutil.which(setting)
        if path is None:
            raise XrayBinaryError(
                f"CORRAL_XRAY_BIN={setting!r} is not an executable file or a command on PATH"
            )
        return path
    for name in ("xray", "v2ray"):
        path = shutil.which(name)
        if path is not None:
            return path
    raise XrayBinaryError(NOT_FOUND)


def inspect_binary(path: str) -> XrayBinary:
    """Ask the executable at `path` what it is (`-version`, else `version`)."""
    # `-version` first: V2Ray 4.x treats the word `version` as "run, reading stdin".
    for flag in ("-version", "version"):
        output = _version_output(path, flag)
        match = VERSION_RE.search(output)
        if match:
            flavor: Flavor = "xray" if match.group(1) == "Xray" else "v2ray"
            version = tuple(int(part) for part in match.group(2).split("."))
            return XrayBinary(path=os.path.abspath(path), flavor=flavor, version=version)
    raise XrayBinaryError(f"{path} does not report an Xray or V2Ray version; is it one of them?")


def _version_output(path: str, flag: str) -> str:
    try:
        completed = subprocess.run(
            [path, flag],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=VERSION_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise XrayBinaryError(f"cannot run {path} {flag}: {error}") from error
    return (completed.stdout + completed.stderr).decode(errors="replace")


async def validate(
    binary: XrayBinary, config: Mapping[str, Any], *, env: Mapping[str, str] | None = None
) -> str | None:
    """None when the binary accepts `config` (its test mode), else the binary's error text.

    `env` adds environment variables (e.g. the geoip/geosite folder) to the binary's.
    """
    with tempfile.TemporaryDirectory(prefix="corral-xray-test-") as folder:
        path = write_config(config, Path(folder))
        process = await asyncio.create_subprocess_exec(
            *binary.test_args(path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **env} if env else None,
        )
        try:
            async with asyncio.timeout(VALIDATE_TIMEOUT):
                output, _ = await process.communicate()
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await asyncio.shield(process.wait())
    if process.returncode == 0:
        return None
    return _error_text(output.decode(errors="replace"), str(path), process.returncode)


def _error_text(output: str, config_path: str, returncode: int | None) -> str:
    """The binary's complaint without its banner, info lines or our temporary file name."""
    lines = [
        line.strip()
        for line in output.replace(config_path, "config").splitlines()
        if line.strip()
        and not VERSION_RE.match(line)
        and "A unified platform for anti-censorship" not in line
        and "[Info]" not in line
    ]
    text = "\n".join(lines) or output.strip()
    return f"{text} (exit status {returncode})" if text else f"exit status {returncode}"
