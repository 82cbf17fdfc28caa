"""The `corral` command, run for real: the embedded default, clear one-line errors."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server import __version__
from tests.fixtures.processes import (
    CORRAL_BIN,
    browser_login,
    first_admin_password,
    free_port,
    stop,
    wait_for_http,
)


def corral_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(extra)
    return env


def run_corral(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CORRAL_BIN), *args],
        cwd=cwd,
        env=corral_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`corral serve` with no configuration at all, in an empty folder, on a free port."""
    port = free_port()
    process = subprocess.Popen(
        [str(CORRAL_BIN), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=corral_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/healthz", process)
        yield process, base
    finally:
        stop(process)


def test_version(tmp_path: Path) -> None:
    result = run_corral("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"corral {__version__}"


def test_serve_runs_on_embedded_sqlite_with_no_configuration(
    serve: tuple[subprocess.Popen[str], str], tmp_path: Path
) -> None:
    process, base = serve
    assert httpx.get(f"{base}/readyz").text == "ready"
    password, _printed = first_admin_password(process)  # the first admin, made on this start
    mutation = 'mutation { createProfile(input: {name: "first"}) { profile { name } } }'
    with httpx.Client(base_url=base) as browser:
        assert browser_login(browser, "admin", password).status_code == 303
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', browser.get("/").text)
        assert csrf is not None
        headers = {"X-CSRF-Token": csrf.group(1)}
        body = browser.post("/graphql", json={"query": mutation}, headers=headers).json()
        graphiql = browser.get("/graphql", headers={"accept": "text/html"})
    assert body["data"]["createProfile"]["profile"] == {"name": "first"}
    data_dir = tmp_path / ".corral"
    assert (data_dir / "corral.db").exists()
    assert (data_dir / "secret.key").stat().st_mode & 0o777 == 0o600
    assert graphiql.status_code == 200
    assert "graphiql" in graphiql.text.lower()
    code, output = stop(process)
    # uvicorn re-raises the SIGTERM it handled, after a graceful shutdown.
    assert code in (0, -15), output
    assert f"listening on {base}/" in output
    assert "Application shutdown complete" in output


def test_serve_listens_on_loopback_only_by_default(
    serve: tuple[subprocess.Popen[str], str],
) -> None:
    _process, base = serve
    assert base.startswith("http://127.0.0.1:")
    port = base.rsplit(":", 1)[1]
    listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
    local = {line.split()[1] for line in listening if line.split()[3] == "0A"}
    assert f"0100007F:{int(port):04X}" in local
    assert f"00000000:{int(port):04X}" not in local


def test_bad_setting_is_one_readable_line(tmp_path: Path) -> None:
    result = run_corral("serve", cwd=tmp_path, CORRAL_PORT="not-a-port")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert result.stderr.startswith("corral: error: invalid setting CORRAL_PORT")


def test_wrong_secret_key_refuses_to_start(tmp_path: Path) -> None:
    first = run_corral("check", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "ok" in first.stdout
    other_key = run_corral("genkey", cwd=tmp_path).stdout.strip()
    for command in ("check", "serve"):
        refused = run_corral(command, cwd=tmp_path, CORRAL_SECRET_KEY=other_key)
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1, refused.stderr
        assert "CORRAL_SECRET_KEY is not the key" in refused.stderr


def test_external_database_must_be_migrated_first(
    tmp_path: Path, postgres_databases: object
) -> None:
    url = postgres_databases("corral_cli")  # type: ignore[operator]
    env = {
        "CORRAL_DATABASE_URL": url,
        "CORRAL_SECRET_KEY": run_corral("genkey", cwd=tmp_path).stdout.strip(),
    }
    refused = run_corral("check", cwd=tmp_path, **env)
    assert refused.returncode == 1
    assert "run `corral migrate`" in refused.stderr
    migrated = run_corral("migrate", cwd=tmp_path, **env)
    assert migrated.returncode == 0, migrated.stderr
    assert "is at revision" in migrated.stdout
    assert run_corral("check", cwd=tmp_path, **env).returncode == 0
    down = run_corral("migrate", "--down", "base", cwd=tmp_path, **env)
    assert "base (empty)" in down.stdout


def test_unreachable_database_is_one_line(tmp_path: Path) -> None:
    port = free_port()
    env = {
        "CORRAL_DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:{port}/none",
        "CORRAL_SECRET_KEY": run_corral("genkey", cwd=tmp_path).stdout.strip(),
    }
    result = run_corral("check", cwd=tmp_path, **env)
    assert result.returncode == 1
    assert result.stderr.startswith("corral: error: cannot reach the database")
    assert result.stderr.count("\n") == 1
