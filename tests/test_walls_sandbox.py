"""Walls (issue 10): a command cannot read Corral's own files, other profiles' or other
commands' folders, or the server's environment; nothing it starts outlives it.

Real processes through the public API, in each protection mode: `bwrap` (the bubblewrap
sandbox), `user` (as an unprivileged user: this test suite runs as root) and `none`
(where only the no-escape guarantee holds, through the runner being a subreaper).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from runner.sandbox import BWRAP, NONE, USER, RunAs, Sandbox, SandboxError
from server.app import create_app
from server.settings import Settings
from tests.conftest import TEST_KEY, GraphQLClient
from tests.fixtures.auth import admin_client
from tests.fixtures.commands import logs_of, run, wait_final, wait_status
from tests.fixtures.processes import CORRAL_BIN, free_port, stop, wait_for_http
from tests.test_supervisor import CANCEL, pk, profile

RUN_AS = "nobody"
KEY_CANARY = "KEYCANARY" + uuid.uuid4().hex
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="`user` mode needs root")


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A folder an unprivileged user can reach (pytest's tmp_path is inside a 0700 one)."""
    folder = Path(tempfile.mkdtemp(prefix="corral-walls-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def walled(settings: Settings, mode: str, workspace: Path) -> Settings:
    """`mode`: a CORRAL_SANDBOX value, or `bwrap+user` (the sandbox, as the run-as user)."""
    sandbox, _, as_user = mode.partition("+")
    update: dict[str, object] = {"sandbox": sandbox, "kill_grace_seconds": 1.0}
    if "user" in (sandbox, as_user):
        update |= {"run_as": RUN_AS, "workspace_dir": workspace / "work"}
    return settings.model_copy(update=update)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[GraphQLClient]:
    """The app with its lifespan running, and a GraphQL client for it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app), admin_client(app) as http:
        yield GraphQLClient(http)


MODES = [
    "bwrap",
    pytest.param("user", marks=needs_root),
    pytest.param("bwrap+user", marks=needs_root),
]


def all_text(lines: list[dict[str, object]]) -> str:
    return "\n".join(str(line["text"]) for line in lines)


@pytest.mark.parametrize("walls", MODES)
async def test_a_command_cannot_read_corrals_files_or_its_neighbours(
    settings: Settings, reachable_dir: Path, walls: str
) -> None:
    settings = walled(settings, walls, reachable_dir)
    async with running(settings) as gql:
        await _cannot_read(gql, settings, walls)


async def _cannot_read(gql: GraphQLClient, settings: Settings, walls: str) -> None:
    data_dir = settings.data_dir.resolve()
    # What a command must not read: the key (a canary in the key file's place), the
    # database, another profile's dir, another command's dir, the server's environment.
    key_file = data_dir / "secret.key"
    key_file.write_text(KEY_CANARY + "\n")
    key_file.chmod(0o600)
    other = await profile(gql, "other")
    other_dir = settings.profiles_dir / str(pk(other))
    other_dir.mkdir(parents=True)
    (other_dir / "Cookies").write_text("PROFILECANARY\n")
    first = await run(gql, commandString="sh -c 'echo COMMANDCANARY > note'")
    assert (await wait_final(gql, first))["status"] == "SUCCEEDED"
    first_dir = settings.commands_dir / str(pk(first))
    # Something of the server's environment that a command's own does not have.
    environ = Path("/proc/self/environ").read_bytes().decode(errors="replace").split("\0")
    server_environ = max(
        (item for item in environ if item.split("=")[0] not in {"PATH", "HOME", "LANG"}), key=len
    )
    tries = {
        "key-old-place": "cat ../../secret.key",  # where an older Corral's layout had it
        "key": "cat ../../../" + data_dir.name + "/secret.key",
        "key-abs": f"cat {key_file}",
        "db": f"head -c 64 {data_dir}/corral.db",
        "ls-data": f"ls {data_dir}",
        "profile": f"cat {other_dir}/Cookies",
        "ls-profile": f"ls {other_dir}",
        "command": f"cat {first_dir}/note",
        "server-env": f"cat /proc/{os.getpid()}/environ",
        "parent-env": "cat /proc/$PPID/environ",
    }
    script = "; ".join(f"{probe} || echo DENIED:{name}" for name, probe in tries.items())
    # A command with a profile of its own and no services.
    mine = await profile(gql, "mine")
    command_id = await run(gql, commandString=f"sh -c {_quote(script)}", profileId=mine)
    final = await wait_final(gql, command_id)
    assert final["status"] in {"SUCCEEDED", "FAILED"}
    stored = all_text(await logs_of(gql, command_id))
    secrets = [KEY_CANARY, "SQLite format", server_environ]
    if walls.startswith("bwrap"):
        secrets += ["PROFILECANARY", "COMMANDCANARY"]
    for secret in secrets:
        assert secret not in stored, stored
    denied = {name for name in tries if f"DENIED:{name}" in stored}
    must = set(tries)
    if walls.startswith("bwrap"):
        # Its parent is its sandbox's init, whose environment is the command's own.
        must.discard("parent-env")
    else:
        # One user runs all commands: they can read each other's folders (see README).
        must -= {"profile", "ls-profile", "command"}
    assert denied >= must, stored


@pytest.mark.parametrize("walls", MODES)
async def test_a_command_still_reads_and_writes_its_own_folders(
    settings: Settings, reachable_dir: Path, walls: str
) -> None:
    async with running(walled(settings, walls, reachable_dir)) as gql:
        await _own_folders(gql)


async def _own_folders(gql: GraphQLClient) -> None:
    mine = await profile(gql, "mine")
    script = 'echo hi > here && cat here && echo pd > "$1/x" && cat "$1/x" && ls /usr/bin/env'
    command_id = await run(
        gql, commandString=f"sh -c {_quote(script)} sh {{{{ profile.dir }}}}", profileId=mine
    )
    final = await wait_final(gql, command_id)
    lines = await logs_of(gql, command_id)
    assert final["status"] == "SUCCEEDED", lines
    assert [line["text"] for line in lines if line["stream"] == "STDOUT"] == [
        "hi",
        "pd",
        "/usr/bin/env",
    ]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


@needs_root
async def test_a_workspace_out_of_the_run_as_users_reach_is_refused(settings: Settings) -> None:
    # The default workspace sits beside the data dir, here inside pytest's 0700 folder.
    settings = settings.model_copy(update={"sandbox": "user", "run_as": RUN_AS})
    app = create_app(settings)
    with pytest.raises(SandboxError, match=f"out of reach of CORRAL_RUN_AS={RUN_AS}"):
        async with app.router.lifespan_context(app):
            pass


# -- modes of the private files ---------------------------------------------------------


async def test_private_files_are_created_private(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", sandbox="none")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        pass
    data_dir = settings.data_dir
    assert data_dir.stat().st_mode & 0o777 == 0o700
    for name in ("corral.db", "secret.key"):
        assert (data_dir / name).stat().st_mode & 0o777 == 0o600, name
    for side in data_dir.glob("corral.db-*"):
        assert side.stat().st_mode & 0o777 == 0o600, side.name
    # Commands' and profiles' folders are not in it.
    assert not settings.resolved_workspace_dir.is_relative_to(data_dir)


async def test_loose_private_files_are_tightened_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=tmp_path / "data", sandbox="none")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        pass
    data_dir = settings.data_dir
    data_dir.chmod(0o755)
    for name in ("corral.db", "secret.key"):
        (data_dir / name).chmod(0o644)
    with caplog.at_level(logging.INFO, logger="corral"):
        async with app.router.lifespan_context(app):
            pass
    assert data_dir.stat().st_mode & 0o777 == 0o700
    for name in ("corral.db", "secret.key"):
        assert (data_dir / name).stat().st_mode & 0o777 == 0o600, name
        assert f"tightened {data_dir / name} from mode 644 to 600" in caplog.text


async def test_a_profile_dir_of_an_older_corral_moves_out_of_the_data_dir(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path / "data", sandbox="none", secret_key=TEST_KEY)
    legacy = settings.data_dir / "profiles" / "7"
    legacy.mkdir(parents=True)
    (legacy / "Cookies").write_text("kept")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        pass
    assert (settings.profiles_dir / "7" / "Cookies").read_text() == "kept"
    assert not legacy.exists()


# -- no escape ----------------------------------------------------------------------------


def escapees(tag: str) -> list[int]:
    """Live processes on this host running `sleep <tag>`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if argv[:2] == [b"sleep", tag.encode()] and state != "Z":
            found.append(int(entry.name))
    return found


async def wait_escapees(tag: str, present: bool, timeout: float) -> list[int]:
    """The `sleep <tag>` processes, once some are there (`present`) or none is, or at the
    timeout."""
    deadline = time.monotonic() + timeout
    while bool(found := escapees(tag)) != present and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    return found


@pytest.mark.parametrize("mode", [*MODES, "none"])
@pytest.mark.parametrize("ending", ["exit", "timeout", "cancel"])
async def test_a_child_that_leaves_its_session_and_clears_its_environment_is_stopped(
    settings: Settings,
    reachable_dir: Path,
    mode: str,
    ending: str,
) -> None:
    settings = walled(settings, mode, reachable_dir)
    tag = f"1000.{uuid.uuid4().int % 10**6}"  # `sleep 1000.NNN`: found by its argv
    escape = f"setsid env -i sh -c 'echo $$ > escaped.pid; exec sleep {tag}' </dev/null &"
    wait = "sleep 0.5" if ending == "exit" else "sleep 300"
    script = f"{escape} {wait}"
    async with running(settings) as gql:
        timeout = 1 if ending == "timeout" else 60
        command_id = await run(gql, commandString=f"sh -c {_quote(script)}", timeoutSeconds=timeout)
        workdir = settings.commands_dir / str(pk(command_id))
        if ending == "cancel":
            await wait_status(gql, command_id, {"RUNNING"})
            assert await wait_escapees(tag, True, 10), "the escaping child never started"
            assert (await gql(CANCEL, id=command_id))["cancelCommand"]["userErrors"] == []
        final = await wait_final(gql, command_id, timeout=30)
        expected = {"exit": "SUCCEEDED", "timeout": "TIMED_OUT", "cancel": "CANCELLED"}[ending]
        assert final["status"] == expected, final
        assert (workdir / "escaped.pid").read_text().strip().isdigit()  # it did run
        assert await wait_escapees(tag, False, 5) == []


def test_only_a_pid_namespace_keeps_every_process_of_a_command_in_its_group() -> None:
    """The runner looks for what left a command's group by its marker unless the sandbox's
    PID namespace ended with the group (its init is a member): that needs --unshare-pid."""
    bwrap = Sandbox(BWRAP, bwrap="/usr/bin/bwrap")
    assert bwrap.contains_processes
    assert "--unshare-pid" in bwrap.wrap(["true"], "/w")
    assert not Sandbox(USER, run_as=RunAs(RUN_AS, 65534, 65534)).contains_processes
    assert not Sandbox(NONE).contains_processes


# -- which protection is in force ---------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "level", "words"),
    [("bwrap", logging.INFO, "bubblewrap sandbox"), ("none", logging.WARNING, "NO protection")],
)
async def test_the_runner_says_which_protection_is_in_force(
    settings: Settings, caplog: pytest.LogCaptureFixture, mode: str, level: int, words: str
) -> None:
    settings = settings.model_copy(update={"sandbox": mode})
    app = create_app(settings)
    with caplog.at_level(logging.INFO, logger="corral"):
        async with app.router.lifespan_context(app):
            pass
    said = [r for r in caplog.records if "event=protection" in r.getMessage()]
    assert len(said) == 1
    assert said[0].levelno == level
    assert f"mode={mode}" in said[0].getMessage()
    assert words in said[0].getMessage()


@pytest.mark.parametrize(
    ("mode", "printed"),
    [
        ("auto", "Corral protection: commands run in a bubblewrap sandbox"),
        ("none", "Corral WARNING: NO protection"),
    ],
)
def test_serve_prints_the_protection(tmp_path: Path, mode: str, printed: str) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    process = subprocess.Popen(
        [str(CORRAL_BIN), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env | {"CORRAL_SANDBOX": mode},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", process)
    finally:
        _code, output = stop(process)
    assert printed in output, output


def test_an_impossible_choice_is_one_readable_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    done = subprocess.run(
        [str(CORRAL_BIN), "serve", "--port", "0"],
        cwd=tmp_path,
        env=env | {"CORRAL_SANDBOX": "user"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "corral: error: CORRAL_SANDBOX=user needs CORRAL_RUN_AS and Corral running as root"
    )


async def test_a_profile_dir_may_not_open_up_corrals_files_or_the_system(
    gql: GraphQLClient, settings: Settings, tmp_path: Path
) -> None:
    """A profile's own userDataDir is bound read-write into its commands' sandbox (and
    chowned to CORRAL_RUN_AS): one inside or above the data dir or the workspace, or a system
    folder, would hand the command the key and the database. Refused when saved, and by the
    runner for a profile saved before the rule."""
    create = (
        "mutation($d: String!) { createProfile(input: {name: $d, userDataDir: $d}) {"
        " profile { id } userErrors { field code message } } }"
    )
    for bad in (
        str(settings.data_dir),
        str(settings.data_dir / "sub"),
        str(settings.data_dir.parent),
        str(settings.commands_dir / "1"),
        "/",
        "/etc",
        "/usr/lib/x",
        "/tmp",
    ):
        payload = (await gql(create, d=bad))["createProfile"]
        assert payload["profile"] is None, bad
        assert [(e["field"], e["code"]) for e in payload["userErrors"]] == [
            (["userDataDir"], "INVALID")
        ], (bad, payload)
    fine = str(tmp_path / "elsewhere" / "chrome")
    made = (await gql(create, d=fine))["createProfile"]
    assert made["userErrors"] == [], made
    assert made["profile"], made
    # Saved before the rule (straight into the database): the runner refuses to run it.
    from sqlalchemy import update

    from server.db import create_engine
    from server.models import Profile

    engine = create_engine(settings)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                update(Profile)
                .values(user_data_dir=str(settings.data_dir))
                .where(Profile.id == pk(made["profile"]["id"]))
            )
    finally:
        await engine.dispose()
    node = await wait_final(
        gql, await run(gql, commandString="cat secret.key", profileId=made["profile"]["id"])
    )
    assert node["status"] == "FAILED", node
    assert "userDataDir must not be inside Corral's data dir" in (node["error"] or "")


def test_a_database_outside_the_data_dir_leaves_its_folder_alone(tmp_path: Path) -> None:
    """Only Corral's own data dir is made 0700: a database named in a shared folder (/tmp,
    say) is made 0600 itself and its folder keeps its modes (and sticky bit)."""
    from server.db import create_engine

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite+aiosqlite:///{shared}/corral.db",
        secret_key=TEST_KEY,
    )
    asyncio.run(create_engine(settings).dispose())
    assert shared.stat().st_mode & 0o7777 == 0o1777
    assert (shared / "corral.db").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_orphans_that_come_to_the_runner_are_reaped(settings: Settings) -> None:
    """The runner is a child subreaper: every orphan below it comes to it (a browser's
    helpers whose parent died, say), not only a command's escaped processes; their zombies
    are reaped, not left to fill the process table."""
    application = create_app(settings.model_copy(update={"lease_seconds": 0.6}))
    async with application.router.lifespan_context(application):
        shell = subprocess.run(
            ["sh", "-c", "sleep 0.2 >/dev/null 2>&1 & echo $!"],
            capture_output=True,
            text=True,
            check=True,
            start_new_session=True,
        )
        orphan = int(shell.stdout)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{orphan}"):
            assert time.monotonic() < deadline, Path(f"/proc/{orphan}/stat").read_text()
            await asyncio.sleep(0.1)
