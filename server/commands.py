"""Commands: compose a template + profile + proxy + services into a queued run; cancel, retry."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from runner.renderpool import RenderPool
from runner.template_env import CompositionError
from runner.template_params import check_params
from server.broker import CANCEL_TOPIC, QUEUE_TOPIC
from server.errors import ErrorCode, InvalidInput, UserError
from server.models import (
    BACKOFF_SECONDS_DEFAULT,
    Command,
    CommandService,
    CommandStatus,
    CommandTemplate,
    Profile,
    ProfileProxy,
    ProfileService,
    Proxy,
    Service,
    utcnow,
)
from server.profiles import get_profile, user_data_dir
from server.proxies import get_proxy, proxy_hops
from server.routing import routing_table
from server.secretbox import SecretBox
from server.services import get_service
from server.settings import Settings
from server.templates import MAX_TIMEOUT_SECONDS, draft_template, get_template, sample_params
from server.unit_of_work import announce, announce_status
from server.validation import JSON_MAX_BYTES, env_name_problem
from xray.sidecar import sidecar_url

PROXY_URL_ENV = "CORRAL_PROXY_URL"
# A proxied run gets the URL of its own sidecar, whose port is picked when it starts.
SIDECAR_URL_PLACEHOLDER = sidecar_url("<sidecar>")
COMMAND_STRING_MAX = 100_000
PRIORITY_RANGE = (-1000, 1000)


@dataclass
class RunRequest:
    """What a client asks to run (IDs already decoded)."""

    template_id: int | None = None
    command_string: str | None = None
    profile_id: int | None = None
    proxy_id: int | None = None
    service_ids: list[int] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    timeout_seconds: int | None = None
    max_attempts: int | None = None
    priority: int = 0


@dataclass
class Composition:
    """A composed command: what would run, and with which environment variable names."""

    source: str
    argv: list[str]
    env_names: list[str]
    params: dict[str, Any]
    template: CommandTemplate | None
    profile: Profile | None
    proxy: Proxy | None
    services: list[Service]
    timeout_seconds: int | None
    max_attempts: int
    backoff_seconds: float
    template_env: dict[str, str]
    routing_table: list[str] = field(default_factory=list)
    note: str | None = None


def command_context(
    settings: Settings,
    profile: Profile | None,
    proxy: Proxy | None,
    services: list[Service],
    params: dict[str, Any],
    proxy_url: str | None = None,
) -> dict[str, Any]:
    """What a template sees: public fields only, never tokens or proxy credentials."""
    context: dict[str, Any] = {"params": params, "services": [_service_view(s) for s in services]}
    if profile is not None:
        context["profile"] = _profile_view(profile, settings)
    if proxy is not None:
        context["proxy"] = {
            "name": proxy.name,
            "protocol": proxy.protocol,
            "host": proxy.host,
            "port": proxy.port,
            # The child talks to its sidecar, never to the upstream (a preview has no port yet).
            "url": proxy_url or SIDECAR_URL_PLACEHOLDER,
        }
    return context


def _profile_view(profile: Profile, settings: Settings) -> dict[str, Any]:
    return {
        "name": profile.name,
        "dir": user_data_dir(profile, settings),
        "user_agent": profile.user_agent,
        "locale": profile.locale,
        "timezone": profile.timezone,
        "viewport": {"width": profile.viewport_width, "height": profile.viewport_height},
        "headless": profile.headless,
        "tags": list(profile.tags),
    }


def browser_settings(profile: Profile) -> dict[str, Any]:
    """The profile's browser settings as the Playwright host reads them (null: its default)."""
    viewport = None
    if profile.viewport_width and profile.viewport_height:
        viewport = {"width": profile.viewport_width, "height": profile.viewport_height}
    return {
        "userAgent": profile.user_agent,
        "locale": profile.locale,
        "timezone": profile.timezone,
        "viewport": viewport,
        "headless": profile.headless,
    }


def _service_view(service: Service) -> dict[str, Any]:
    return {
        "name": service.name,
        "kind": service.kind,
        "env_var": service.env_var,
        "base_url": service.base_url,
    }


async def _source(session: AsyncSession, request: RunRequest) -> tuple[str, CommandTemplate | None]:
    if (request.template_id is None) == (request.command_string is None):
        raise InvalidInput.one(
            "templateId", "give either templateId or commandString", ErrorCode.REQUIRED
        )
    if request.template_id is not None:
        template = await get_template(session, request.template_id, field="templateId")
        return template.template, template
    source = (request.command_string or "").strip()
    if not source:
        raise InvalidInput.one("commandString", "commandString cannot be blank", ErrorCode.BLANK)
    if len(source) > COMMAND_STRING_MAX:
        raise InvalidInput.one("commandString", "commandString is too long", ErrorCode.TOO_LONG)
    return source, None


async def _proxy(
    session: AsyncSession, request: RunRequest, profile: Profile | None
) -> Proxy | None:
    """The named proxy (attached to the profile), else the profile's default, else none."""
    if request.proxy_id is not None:
        proxy = await get_proxy(session, request.proxy_id, field="proxyId")
        if profile is not None and await session.get(ProfileProxy, (profile.id, proxy.id)) is None:
            raise InvalidInput.one(
                "proxyId",
                f"proxy {proxy.name!r} is not attached to profile {profile.name!r}",
                ErrorCode.INVALID,
            )
        return proxy
    if profile is None:
        return None
    return await session.scalar(
        select(Proxy)
        .join(ProfileProxy, ProfileProxy.proxy_id == Proxy.id)
        .where(ProfileProxy.profile_id == profile.id, ProfileProxy.is_default.is_(True))
    )


async def _services(
    session: AsyncSession, request: RunRequest, profile: Profile | None
) -> list[Service]:
    """The named services, else all the profile's linked services."""
    if request.service_ids is None:
        if profile is None:
            return []
        rows = await session.scalars(
            select(Service)
            .join(ProfileService, ProfileService.service_id == Service.id)
            .where(ProfileService.profile_id == profile.id)
            .order_by(Service.name)
        )
        return list(rows)
    services: dict[int, Service] = {}
    for index, service_id in enumerate(request.service_ids):
        service = await get_service(session, service_id, field=f"serviceIds.{index}")
        services[service.id] = service
    return list(services.values())


async def own_tokens(
    session: AsyncSession, profile_id: int | None, services: list[Service]
) -> dict[int, bytes]:
    """The profile's own tokens (encrypted) of these services, by service id (a link
    without a token of its own is left out: the shared token is used)."""
    if profile_id is None or not services:
        return {}
    rows = await session.execute(
        select(ProfileService.service_id, ProfileService.token_encrypted).where(
            ProfileService.profile_id == profile_id,
            ProfileService.service_id.in_([s.id for s in services]),
            ProfileService.token_encrypted.is_not(None),
        )
    )
    return {service_id: token for service_id, token in rows.all() if token is not None}


def choose_tokens(
    box: SecretBox, services: list[Service], own: dict[int, bytes]
) -> dict[str, str | None]:
    """Each service's token (the profile's `own`, else the shared one), by env var."""
    tokens: dict[str, str | None] = {}
    for service in services:
        encrypted = own.get(service.id) or service.token_encrypted
        tokens[service.env_var] = None if encrypted is None else box.decrypt(encrypted)
    return tokens


async def service_tokens(
    session: AsyncSession, box: SecretBox, profile_id: int | None, services: list[Service]
) -> dict[str, str | None]:
    """Each service's token for this profile (its own, else the shared one), by env var."""
    return choose_tokens(box, services, await own_tokens(session, profile_id, services))


def _check_env_names(services: list[Service], template_env: dict[str, str]) -> None:
    seen: dict[str, str] = {}
    errors = []
    for service in services:
        if service.env_var in seen:
            errors.append(
                UserError(
                    ("serviceIds",),
                    f"services {seen[service.env_var]!r} and {service.name!r} both use "
                    f"{service.env_var}",
                    ErrorCode.INVALID,
                )
            )
        seen[service.env_var] = service.name
    # Rows saved before a name was refused (issue 12, item 9) are refused here, at compose.
    for service in services:
        problem = env_name_problem(service.env_var)
        if problem is not None:
            errors.append(
                UserError(("serviceIds",), f"{service.name!r}: {problem}", ErrorCode.INVALID)
            )
    for name in template_env:
        problem = env_name_problem(name)
        if problem is not None:
            errors.append(
                UserError(("templateId",), f"the template's env: {problem}", ErrorCode.INVALID)
            )
        if name in seen:
            errors.append(
                UserError(
                    ("templateId",),
                    f"the template's env sets {name}, which carries {seen[name]!r}'s token",
                    ErrorCode.INVALID,
                )
            )
    if errors:
        raise InvalidInput(errors)


def _out_of_range(field: str, value: object, low: int, high: int) -> UserError | None:
    """The error of an integer limit outside [low, high] (or no integer at all: the panel
    passes what was typed through, for this check to refuse next to its field)."""
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return None
    message = f"{field} must be between {low} and {high}"
    return UserError((field,), message, ErrorCode.OUT_OF_RANGE)


def _limits(
    settings: Settings, request: RunRequest, template: CommandTemplate | None
) -> tuple[int | None, int]:
    timeout, attempts = request.timeout_seconds, request.max_attempts
    checks = [
        ("timeoutSeconds", timeout, 1, MAX_TIMEOUT_SECONDS),
        ("maxAttempts", attempts, 1, 100),
        ("priority", request.priority, *PRIORITY_RANGE),
    ]
    errors = [
        error
        for field, value, low, high in checks
        if value is not None and (error := _out_of_range(field, value, low, high)) is not None
    ]
    if errors:
        raise InvalidInput(errors)
    if timeout is None:
        timeout = template.timeout_seconds if template else None
    if timeout is None:
        timeout = settings.default_timeout_seconds
    if attempts is None:
        attempts = template.max_attempts if template else 1
    return timeout, attempts


def _params(request: RunRequest, template: CommandTemplate | None) -> dict[str, Any]:
    if not isinstance(request.params, dict):
        raise InvalidInput.one("params", "params must be a JSON object", ErrorCode.INVALID)
    try:
        size = len(json.dumps(request.params, allow_nan=False))
    except ValueError as exc:
        raise InvalidInput.one(
            "params", "params must not contain NaN or Infinity", ErrorCode.INVALID
        ) from exc
    if size > JSON_MAX_BYTES:
        raise InvalidInput.one("params", "params are too large", ErrorCode.TOO_LONG)
    if template is None:
        return dict(request.params)
    checked = check_params(template.parameters, request.params)
    if checked.problems:
        raise InvalidInput(
            [UserError(("params", p.name), p.message, ErrorCode.INVALID) for p in checked.problems]
        )
    return checked.values


async def compose_command(
    session: AsyncSession,
    settings: Settings,
    box: SecretBox,
    renderer: RenderPool,
    request: RunRequest,
) -> Composition:
    """Resolve and validate everything a run needs, and render its argv (runs nothing)."""
    source, template = await _source(session, request)
    return await _compose(session, settings, box, renderer, request, source, template)


async def compose_draft(
    session: AsyncSession,
    settings: Settings,
    box: SecretBox,
    renderer: RenderPool,
    values: dict[str, Any],
    request: RunRequest,
) -> Composition:
    """compose_command for an unsaved template (`values` as create_template takes them):
    the editor's live preview. Parameters without a typed value or default get a sample."""
    draft = draft_template(values)
    params = {**sample_params(draft.parameters), **request.params}
    with_params = replace(request, template_id=None, command_string=None, params=params)
    return await _compose(session, settings, box, renderer, with_params, draft.template, draft)


async def _compose(
    session: AsyncSession,
    settings: Settings,
    box: SecretBox,
    renderer: RenderPool,
    request: RunRequest,
    source: str,
    template: CommandTemplate | None,
) -> Composition:
    profile = (
        None
        if request.profile_id is None
        else await get_profile(session, request.profile_id, field="profileId")
    )
    proxy = await _proxy(session, request, profile)
    services = await _services(session, request, profile)
    template_env = dict(template.env) if template else {}
    _check_env_names(services, template_env)
    tokens = await service_tokens(session, box, profile.id if profile else None, services)
    missing = [s.name for s in services if tokens.get(s.env_var) is None]
    if missing:
        raise InvalidInput.one(
            "serviceIds",
            f"no token for {', '.join(missing)}: set the service's shared token or link "
            "the profile with its own",
            ErrorCode.REQUIRED,
        )
    params = _params(request, template)
    timeout, attempts = _limits(settings, request, template)
    context = command_context(settings, profile, proxy, services, params)
    try:
        argv = await renderer.render(source, context)
    except CompositionError as exc:
        where = "templateId" if template else "commandString"
        raise InvalidInput.one(where, str(exc), ErrorCode.INVALID) from exc
    env_names = sorted({*tokens, *template_env, *([PROXY_URL_ENV] if proxy else [])})
    return Composition(
        source=source,
        argv=argv,
        env_names=env_names,
        params=params,
        template=template,
        profile=profile,
        proxy=proxy,
        services=services,
        timeout_seconds=timeout,
        max_attempts=attempts,
        backoff_seconds=template.backoff_seconds if template else BACKOFF_SECONDS_DEFAULT,
        template_env=template_env,
        routing_table=[] if proxy is None else await routing_table(session, proxy),
        note=None if proxy is None else await sidecar_note(session, proxy),
    )


async def sidecar_note(session: AsyncSession, proxy: Proxy) -> str:
    """One sentence on where a proxied run's traffic goes (names only, never credentials)."""
    hops = await proxy_hops(session, proxy)
    note = (
        f"The run goes through a local sidecar ({SIDECAR_URL_PLACEHOLDER}, {PROXY_URL_ENV}) "
        f"on a port picked at start; it forwards to proxy {proxy.name!r}"
    )
    if len(hops) > 1:  # traffic reaches the farthest `via` hop first
        note += f" (chain: sidecar → {' → '.join(repr(hop.name) for hop in reversed(hops))})"
    return note + "."


async def create_command(
    session: AsyncSession,
    settings: Settings,
    box: SecretBox,
    renderer: RenderPool,
    request: RunRequest,
) -> Command:
    """Compose and queue a command."""
    composed = await compose_command(session, settings, box, renderer, request)
    command = Command(
        template_id=composed.template.id if composed.template else None,
        source=composed.source,
        is_ad_hoc=composed.template is None,
        argv=composed.argv,
        env=composed.template_env,
        profile_id=composed.profile.id if composed.profile else None,
        profile_name=composed.profile.name if composed.profile else None,
        proxy_id=composed.proxy.id if composed.proxy else None,
        proxy_name=composed.proxy.name if composed.proxy else None,
        params=composed.params,
        status=CommandStatus.QUEUED,
        priority=request.priority,
        attempts=0,
        max_attempts=composed.max_attempts,
        timeout_seconds=composed.timeout_seconds,
        backoff_seconds=composed.backoff_seconds,
        last_seq=0,
        cancel_requested=False,
        created_at=utcnow(),
    )
    session.add(command)
    await session.flush()
    if composed.services:
        await session.execute(
            insert(CommandService),
            [{"command_id": command.id, "service_id": s.id} for s in composed.services],
        )
    return command


async def run_command(
    session: AsyncSession,
    settings: Settings,
    box: SecretBox,
    renderer: RenderPool,
    request: RunRequest,
) -> Command:
    """Compose and queue a command; the runners hear of it once the unit of work commits."""
    command = await create_command(session, settings, box, renderer, request)
    announce(session, QUEUE_TOPIC, command.id)
    announce_status(session, command.id, command.status)
    return command


async def get_command(session: AsyncSession, command_id: int, *, field: str = "id") -> Command:
    """The command with this id, or a NOT_FOUND error on `field`."""
    command = await session.get(Command, command_id)
    if command is None:
        raise InvalidInput.one(field, "no such command", ErrorCode.NOT_FOUND)
    return command


async def cancel_command(session: AsyncSession, command_id: int) -> Command:
    """Cancel a command: a queued one at once; a running one is flagged, and its runner told
    (once the unit of work commits) to stop its process group."""
    command = await get_command(session, command_id)
    status = command.status
    if status.is_final:
        raise InvalidInput.one(
            "id", f"the command has already finished ({status.value})", ErrorCode.INVALID
        )
    if status is not CommandStatus.RUNNING and await _cancel_unclaimed(session, command):
        announce_status(session, command.id, command.status)
        return command
    # Running, or a runner claimed it meanwhile; flagged only while it is not final (a
    # runner may also have finished it meanwhile: then the flag would stay true forever).
    result = await session.execute(
        update(Command)
        .where(Command.id == command.id, Command.status.in_(NOT_FINAL_STATUSES))
        .values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    await session.refresh(command)
    if not getattr(result, "rowcount", 0):
        raise InvalidInput.one(
            "id", f"the command has already finished ({command.status})", ErrorCode.INVALID
        )
    announce(session, CANCEL_TOPIC, command.id)
    return command


# What a runner has not claimed yet, and what is not over yet.
UNCLAIMED_STATUSES = (CommandStatus.QUEUED, CommandStatus.WAITING)
NOT_FINAL_STATUSES = (*UNCLAIMED_STATUSES, CommandStatus.RUNNING)


async def _cancel_unclaimed(session: AsyncSession, command: Command) -> bool:
    """Cancel a command no runner holds; False when a runner claimed it first."""
    result = await session.execute(
        update(Command)
        .where(Command.id == command.id, Command.status.in_(UNCLAIMED_STATUSES))
        .values(
            status=CommandStatus.CANCELLED,
            finished_at=utcnow(),
            wait_reason=None,
            error="cancelled before it started",
        )
        .execution_options(synchronize_session=False)
    )
    await session.refresh(command)
    return bool(getattr(result, "rowcount", 0))


async def retry_command(session: AsyncSession, command_id: int) -> Command:
    """Queue a finished command once more (its earlier attempts and logs are kept); the
    runners hear of it once the unit of work commits."""
    command = await get_command(session, command_id)
    status = command.status
    if not status.is_final:
        raise InvalidInput.one(
            "id",
            f"only a finished command can be retried (it is {status.value})",
            ErrorCode.INVALID,
        )
    command.status = CommandStatus.QUEUED
    command.max_attempts = command.attempts - command.uncounted_attempts + 1
    command.next_attempt_at = None
    command.finished_at = None
    command.exit_code = None
    command.error = None
    command.wait_reason = None
    command.cancel_requested = False
    await session.flush()
    announce(session, QUEUE_TOPIC, command.id)
    announce_status(session, command.id, command.status)
    return command
