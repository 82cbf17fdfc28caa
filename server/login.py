"""The login page, login and logout (panel sessions).

A login starts a new server-side session (server/auth.start_session) and drops the one the
browser presented, so a session id planted before the login is worthless after it. The
cookie holds the id signed (itsdangerous), HttpOnly, SameSite=Lax, Secure over https.

The login form itself is guarded against login CSRF (a page elsewhere logging the browser
in as the attacker) by a double-submit token: a random value in a short-lived signed cookie
and the same value in a hidden field, which another site can neither read nor set.
Bad passwords are counted per name and per address (server/ratelimit.py, per process).
"""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit

from itsdangerous import BadSignature, TimestampSigner
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from server.access import SESSION_COOKIE, Authenticator, principal_of
from server.app_services import AppServices
from server.audit import Outcome, record_event
from server.auth import (
    Principal,
    TokenHasher,
    check_login,
    end_session,
    find_user,
    session_principal,
    start_session,
)
from server.csrf import FORM_TYPE, media_type, parse_form, tokens_match
from server.models import NAME_MAX, User
from server.pages import render_page, session_user
from server.ratelimit import Attempt, LoginLimiter
from server.settings import Settings

LOGIN_COOKIE = "corral_login_token"
LOGIN_FIELD = "login_token"
LOGIN_TOKEN_SECONDS = 3600  # how long a login form stays good to send
NEXT_MAX = 2048
WRONG_LOGIN = "wrong name or password"
STALE_FORM = "This login form has expired (or the browser refuses cookies): please log in again."


def safe_next(target: str | None) -> str:
    """Where to go after the login: a path on this site, else "/" (no open redirect:
    `//host`, `/\\host`, schemes and control characters, which browsers strip, are refused)."""
    if not target or len(target) > NEXT_MAX or not target.startswith("/"):
        return "/"
    if target.startswith("//") or "\\" in target:
        return "/"
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in target):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or parts.path in ("/login", "/logout"):
        return "/"
    return target


def login_signer(hasher: TokenHasher) -> TimestampSigner:
    """Signs the login form's double-submit cookie (a key of its own, from the token key)."""
    return TimestampSigner(hasher.derive("corral login form"), salt="corral.login")


def client_address(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def shown_name(name: str) -> str | None:
    """A tried user name as the audit log may hold it (printable, at most NAME_MAX)."""
    cleaned = "".join(char if char.isprintable() else "?" for char in name.strip())
    return cleaned[:NAME_MAX] or None


async def known_name(session: AsyncSession, name: str) -> str | None:
    """A failed login's name as the audit log keeps it: only when it is a user's. What was
    typed into the name field may be the password (a slip of the tab key), and every
    viewer reads the audit log."""
    shown = shown_name(name)
    if shown is None or shown != name.strip():  # not printable, or too long: nobody's
        return None
    return shown if await find_user(session, shown) is not None else None


def is_https(request: Request) -> bool:
    # uvicorn --proxy-headers sets the scheme from X-Forwarded-Proto behind a proxy.
    return request.url.scheme == "https"


async def read_form(request: Request) -> dict[str, str]:
    """A urlencoded form's fields; {} for any other body."""
    if media_type(request.headers) != FORM_TYPE:
        return {}
    try:
        return parse_form(await request.body())
    except ValueError:
        return {}


class LoginPages:
    """GET/POST /login and POST /logout; one rate limiter for this app."""

    def __init__(self, settings: Settings) -> None:
        self.limiter = LoginLimiter(settings.login_max_failures, settings.login_window_seconds)
        self.session_seconds = int(settings.session_max_seconds)

    # --- the form ------------------------------------------------------------------

    def form(
        self,
        request: Request,
        *,
        status_code: int = 200,
        message: str | None = None,
        name: str = "",
        next_path: str = "/",
        headers: dict[str, str] | None = None,
    ) -> Response:
        """The login page, with a fresh double-submit token (or the still valid one the
        browser has, so two open login tabs both work)."""
        signer = login_signer(_authenticator(request).hasher)
        token = self._login_token(request, signer) or secrets.token_urlsafe(32)
        response = render_page(
            "login.html",
            principal_of(request.scope),
            status_code=status_code,
            headers=headers,
            message=message,
            name=name[:NAME_MAX],
            next=next_path,
            login_token=token,
        )
        response.set_cookie(
            LOGIN_COOKIE,
            signer.sign(token).decode(),
            max_age=LOGIN_TOKEN_SECONDS,
            path="/login",
            secure=is_https(request),
            httponly=True,
            samesite="lax",
        )
        return response

    @staticmethod
    def _login_token(request: Request, signer: TimestampSigner) -> str | None:
        cookie = request.cookies.get(LOGIN_COOKIE)
        if not cookie:
            return None
        try:
            return signer.unsign(cookie, max_age=LOGIN_TOKEN_SECONDS).decode()
        except (BadSignature, UnicodeDecodeError):
            return None

    async def show(self, request: Request) -> Response:
        return self.form(request, next_path=safe_next(request.query_params.get("next")))

    # --- logging in and out --------------------------------------------------------

    async def submit(self, request: Request) -> Response:
        fields = await read_form(request)
        name, password = fields.get("name", ""), fields.get("password", "")
        next_path = safe_next(fields.get("next"))
        signer = login_signer(_authenticator(request).hasher)
        if not tokens_match(fields.get(LOGIN_FIELD), self._login_token(request, signer) or ""):
            return self.form(request, status_code=403, message=STALE_FORM, next_path=next_path)
        address = client_address(request)
        attempt = self.limiter.begin(name, address)
        services: AppServices = request.app.state.services
        async with services.sessionmaker() as session:
            if not isinstance(attempt, Attempt):
                actor = await known_name(session, name)
                await _record_login(session, None, "error", actor, address, "rate-limited")
                await session.commit()
                message = (
                    "Too many failed logins for this name or from this address: "
                    f"try again in {attempt} seconds."
                )
                return self.form(
                    request,
                    status_code=429,
                    message=message,
                    name=name,
                    next_path=next_path,
                    headers={"Retry-After": str(attempt)},
                )
            user = await check_login(session, name, password)
            if user is None:
                actor = await known_name(session, name)
                await _record_login(session, None, "error", actor, address, "wrong-password")
                await session.commit()
                return self.form(
                    request, status_code=401, message=WRONG_LOGIN, name=name, next_path=next_path
                )
            raw_id = await self._start(request, session, user, address)
        self.limiter.succeeded(attempt)
        return self._logged_in(request, raw_id, next_path)

    async def _start(
        self, request: Request, session: AsyncSession, user: User, address: str
    ) -> str:
        """A new session for `user` (the one the browser came with ends), recorded."""
        previous = session_user(principal_of(request.scope))
        if previous is not None and previous.session_id is not None:
            await end_session(session, previous.session_id)
        row, raw_id = await start_session(session, _authenticator(request).hasher, user, address)
        principal = session_principal(user, row)
        await _record_login(session, principal, "ok", user.name, address, None)
        await session.commit()
        return raw_id

    def _logged_in(self, request: Request, raw_id: str, next_path: str) -> Response:
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            _authenticator(request).cookie_value(raw_id),
            max_age=self.session_seconds,
            path="/",
            secure=is_https(request),
            httponly=True,
            samesite="lax",
        )
        response.delete_cookie(LOGIN_COOKIE, path="/login", secure=is_https(request))
        return response

    async def logout(self, request: Request) -> Response:
        user = session_user(principal_of(request.scope))
        if user is not None and user.session_id is not None:
            services: AppServices = request.app.state.services
            async with services.sessionmaker() as session:
                await end_session(session, user.session_id)
                await record_event(
                    session,
                    principal=user,
                    action="logout",
                    outcome="ok",
                    object_type="user",
                    object_id=None if user.user_id is None else str(user.user_id),
                    client_address=client_address(request),
                )
                await session.commit()
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(
            SESSION_COOKIE, path="/", secure=is_https(request), httponly=True, samesite="lax"
        )
        return response


def _authenticator(request: Request) -> Authenticator:
    authenticator: Authenticator = request.app.state.authenticator
    return authenticator


async def _record_login(
    session: AsyncSession,
    principal: Principal | None,
    outcome: Outcome,
    actor: str | None,
    address: str,
    reason: str | None,
) -> None:
    """A login in the audit log: who tried (a user's name, else nobody), from where, and
    why it failed (never the password)."""
    await record_event(
        session,
        principal=principal,
        action="login",
        outcome=outcome,
        object_type="user",
        object_id=None if principal is None else str(principal.user_id),
        detail=None if reason is None else {"reason": reason},
        client_address=address,
        actor=actor,
    )


def login_routes(settings: Settings) -> list[Route]:
    """The routes of the login page and logout (a login lands on the panel's `/`)."""
    pages = LoginPages(settings)
    return [
        Route("/login", pages.show, methods=["GET"]),
        Route("/login", pages.submit, methods=["POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
    ]
