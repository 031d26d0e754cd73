"""Login for the web page when `http.users_file` is set; without it every page is open.

A session is a signed cookie (user, expiry, a digest of the user's current hash), so it needs
no server-side table and dies when the password changes or the user is removed. The signing key
is random per process: a restart logs everyone out, which is cheap on a review page. Scripts may
send HTTP Basic credentials instead of logging in (`curl -u user`), checked on every request.

The checks wrap each page handler rather than the whole application: the HTTP side port that
mounts these routes keeps its health and metrics paths open to probes and scrapers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote

from aiohttp import web

from relay.web.users import open_users_file

__all__ = ["COOKIE", "Gate", "Handler", "Render", "safe_next"]

log = logging.getLogger(__name__)

COOKIE = "relay_session"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Render = Callable[[web.Request, str, Mapping[str, Any]], web.Response]
USER_KEY = web.RequestKey("user", str)


def safe_next(target: str | None) -> str:
    """Only a path on this site: `//host` or `https://…` would make the login an open redirect."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


class Gate:
    """Decides who sees the pages: everyone, or whoever logged in with the users file."""

    def __init__(
        self,
        users_file: str | None,
        *,
        lifetime: float = 12 * 3600.0,
        failure_delay: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._file = open_users_file(users_file) if users_file else None
        self._key = secrets.token_bytes(32)
        self._lifetime = lifetime
        self._delay = failure_delay
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return self._file is not None

    # --- sessions ----------------------------------------------------------

    def _sign(self, user: str, expires: int, stamp: bytes) -> str:
        message = f"{user}\n{expires}\n".encode() + stamp
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def _cookie(self, user: str) -> str:
        assert self._file is not None
        expires = int(self._clock() + self._lifetime)
        stamp = self._file.current().stamp(user)
        name = base64.urlsafe_b64encode(user.encode()).decode().rstrip("=")
        return f"{name}.{expires}.{self._sign(user, expires, stamp)}"

    def _session_user(self, value: str) -> str | None:
        assert self._file is not None
        try:
            name, expires_text, signature = value.split(".")
            user = base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
            expires = int(expires_text)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None
        users = self._file.current()
        stamp = users.stamp(user)
        good = hmac.compare_digest(signature, self._sign(user, expires, stamp))
        if not good or expires < self._clock() or not users.known(user, stamp):
            return None
        return user

    async def _basic_user(self, header: str) -> str | None:
        assert self._file is not None
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(encoded.strip()).decode().partition(":")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None
        if await self._check(user, password):
            return user
        return None

    async def _check(self, user: str, password: str) -> bool:
        """argon2 and bcrypt take tens of milliseconds: never on the loop that relays mail."""
        assert self._file is not None
        users = self._file.current()
        if await asyncio.to_thread(users.verify, user, password.encode("utf-8")):
            return True
        await asyncio.sleep(self._delay)
        return False

    # --- guarding pages ----------------------------------------------------

    def protect(self, handler: Handler) -> Handler:
        """The handler, behind the login when a users file is set."""
        if self._file is None:
            return handler

        async def guarded(request: web.Request) -> web.StreamResponse:
            header = request.headers.get("Authorization")
            if header is not None:
                user = await self._basic_user(header)
                if user is None:
                    raise web.HTTPUnauthorized(
                        text="wrong user name or password\n",
                        headers={"WWW-Authenticate": 'Basic realm="dedup-relay"'},
                    )
            else:
                user = self._session_user(request.cookies.get(COOKIE, ""))
            if user is None:
                target = quote(request.raw_path, safe="/")
                raise web.HTTPSeeOther(f"/login?next={target}")
            request[USER_KEY] = user
            return await handler(request)

        return guarded

    @staticmethod
    def user(request: web.Request) -> str | None:
        user: str | None = request.get(USER_KEY)
        return user

    # --- the login form ----------------------------------------------------

    async def login_form(self, request: web.Request, render: Render) -> web.StreamResponse:
        if self._file is None:
            raise web.HTTPSeeOther("/")
        context = {"title": "Log in", "next": safe_next(request.query.get("next"))}
        return render(request, "login.html", {**context, "login_name": "", "error": None})

    async def login(self, request: web.Request, render: Render) -> web.StreamResponse:
        if self._file is None:
            raise web.HTTPSeeOther("/")
        form = await request.post()
        user = str(form.get("user", "")).strip()
        password = str(form.get("password", ""))
        target = safe_next(str(form.get("next", "/")))
        if user and password and await self._check(user, password):
            log.info("web login by %s from %s", user, request.remote)
            response = web.HTTPSeeOther(target)
            response.set_cookie(
                COOKIE,
                self._cookie(user),
                max_age=int(self._lifetime),
                httponly=True,
                samesite="Strict",
                secure=request.secure,
                path="/",
            )
            raise response
        log.warning("web login failed for %r from %s", user, request.remote)
        context = {"title": "Log in", "next": target, "login_name": user}
        context["error"] = "Wrong user name or password."
        page = render(request, "login.html", context)
        page.set_status(401)
        return page

    async def logout(self, request: web.Request) -> web.StreamResponse:
        response = web.HTTPSeeOther("/login" if self._file is not None else "/")
        response.del_cookie(COOKIE, path="/")
        raise response
