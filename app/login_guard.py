"""What the server answers before login, and how often a client may try a password.

Gradio's auth (`launch(auth=...)`) checks the password and guards its API routes, but its `/` still embeds the
whole API schema in the login page, and its `/login` takes any number of wrong passwords at full speed. This ASGI
middleware sits between Gradio's outer middleware and its routes when auth is on:

- a client without Gradio's session cookie gets only the login page (with the schema blanked) and the files it
  loads; every other path answers 401;
- failed logins are counted per client address: after FREE_TRIES in a row that address must wait
  (1 s, 2 s, 4 s, ... up to MAX_WAIT_S) and tries made meanwhile get 429 with Retry-After, password unchecked;
- each failure and refusal is logged to stderr with the client address and the user name, never the password.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FREE_TRIES = 5
MAX_WAIT_S = 60.0
FORGET_AFTER_S = 900.0  # a quiet address starts again from zero
MAX_LOGIN_BODY = 16_384
LOGIN_PATHS = ("/login", "/login/")
# What Gradio's login page loads before anyone has signed in (all of it the same for every app), and the
# startup-events call launch() itself makes, unauthenticated, before it returns (it only fires them once).
OPEN_PATHS = {"/favicon.ico", "/theme.css", "/gradio_api/theme.css", "/robots.txt", "/manifest.json"}
OPEN_PATHS.add("/gradio_api/startup-events")
OPEN_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")
API_INFO = re.compile(r"(<script>window\.gradio_api_info = ).*?(;</script>)", re.DOTALL)


def log(message: str) -> None:
    print(f"lora-workbench ui: {message}", file=sys.stderr, flush=True)


@dataclass
class Failures:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


class LoginThrottle:
    """Failed logins per client address, and how long that address must wait before its next try."""

    def __init__(self, free_tries: int = FREE_TRIES, max_wait_s: float = MAX_WAIT_S):
        self.free_tries, self.max_wait_s = free_tries, max_wait_s
        self.by_client: dict[str, Failures] = {}

    def wait_s(self, client: str, now: float) -> float:
        """Seconds this client must still wait (0: it may try now)."""
        entry = self.by_client.get(client)
        return max(entry.locked_until - now, 0.0) if entry else 0.0

    def failed(self, client: str, now: float) -> Failures:
        entry = self.by_client.get(client)
        if entry is None or now - entry.last > FORGET_AFTER_S:
            self._forget_quiet(now)
            entry = self.by_client[client] = Failures()
        entry.count += 1
        entry.last = now
        if entry.count >= self.free_tries:
            entry.locked_until = now + min(2.0 ** (entry.count - self.free_tries), self.max_wait_s)
        return entry

    def succeeded(self, client: str) -> None:
        self.by_client.pop(client, None)

    def _forget_quiet(self, now: float) -> None:
        """Keep the table small under a spray of addresses: drop the ones quiet for FORGET_AFTER_S."""
        if len(self.by_client) > 1024:
            for client in [c for c, e in self.by_client.items() if now - e.last > FORGET_AFTER_S]:
                del self.by_client[client]


def is_open(path: str) -> bool:
    return path == "/" or path in LOGIN_PATHS or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def signed_in(scope: Scope) -> bool:
    """The request carries a session cookie Gradio issued (the same check as Gradio's own get_current_user)."""
    app = scope.get("app")
    cookies = HTTPConnection(scope).cookies
    cookie_id = getattr(app, "cookie_id", None)
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return token is not None and token in getattr(app, "tokens", {})


class LoginGuard:
    """ASGI middleware (see the module docstring); pass it to FastAPI through Gradio's launch(app_kwargs=...)."""

    def __init__(self, app: ASGIApp, throttle: LoginThrottle | None = None):
        self.app = app
        self.throttle = throttle or LoginThrottle()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or signed_in(scope):
            return await self.app(scope, receive, send)
        path = scope["path"]
        if scope["type"] == "websocket" or not is_open(path):
            return await refuse(scope, receive, send)
        if path in LOGIN_PATHS and scope["method"] == "POST":
            return await self.login(scope, receive, send)
        if path == "/" and scope["method"] == "GET":
            return await self.app(scope, receive, without_api_info(send))
        return await self.app(scope, receive, send)

    async def login(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Gradio checks the password unless this client is waiting out its failures; the outcome is counted."""
        client = scope["client"][0] if scope.get("client") else "unknown"
        body = await read_body(receive)
        user = repr((await form_field(scope, replay(body, receive), "username"))[:64])
        wait = self.throttle.wait_s(client, time.monotonic())
        if wait > 0:
            log(f"login refused for user {user} from {client}: too many failed logins, {math.ceil(wait)} s to wait")
            seconds = math.ceil(wait)
            response = JSONResponse(
                {"detail": f"Too many failed logins from your address: wait {seconds} s before trying again."},
                status_code=429,
                headers={"Retry-After": str(seconds)},
            )
            return await response(scope, receive, send)
        status: list[int] = []

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, replay(body, receive), watch)
        if status and status[0] == 200:
            self.throttle.succeeded(client)
        elif status and status[0] in (400, 401):
            entry = self.throttle.failed(client, time.monotonic())
            wait = self.throttle.wait_s(client, time.monotonic())
            then = f"; next try allowed in {math.ceil(wait)} s" if wait else ""
            log(f"failed login for user {user} from {client} ({entry.count} in a row{then})")


async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket":
        return await send({"type": "websocket.close", "code": 1008})
    response = JSONResponse({"detail": "Not authenticated: log in first."}, status_code=401)
    await response(scope, receive, send)


async def read_body(receive: Receive) -> bytes:
    """The login form, read up front to log the user name (and capped: it is two short fields)."""
    body, more = b"", True
    while more and len(body) <= MAX_LOGIN_BODY:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body[:MAX_LOGIN_BODY]


async def form_field(scope: Scope, receive: Receive, name: str) -> str:
    """One field of the login form, parsed as Gradio parses it (urlencoded or multipart; '' when unreadable)."""
    try:
        value = (await Request(scope, receive).form()).get(name)
    except Exception:  # a malformed form is Gradio's to refuse (422); here it only names no user
        return ""
    return value if isinstance(value, str) else ""


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the already-read body to Gradio, then passes on what comes next (a disconnect)."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return again


def without_api_info(send: Send) -> Send:
    """A send that blanks the API schema Gradio embeds in the login page; a page where it cannot find it is not
    served at all (fail closed, should Gradio's template change)."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def filtered(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body" or start is None:
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body, found = API_INFO.subn(r"\g<1>{}\g<2>", b"".join(chunks).decode("utf-8"), count=1)
        status = start["status"]
        if not found and status == 200:
            status, body = 503, "The login page could not be served without the API schema; see the server log."
            log("GET / before login: Gradio's page no longer has the API schema where expected; not served")
        data = body.encode("utf-8")
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(data)).encode()))
        await send({**start, "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data, "more_body": False})

    return filtered
