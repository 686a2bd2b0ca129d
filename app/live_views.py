"""How an open page learns that a live view is out of date, at almost no cost while nothing changes.

A live view (the Train monitor, the Runs table, a run's evaluation, the export job) has a stamp: a short hash of
the keys its redraw compares (train_tab.monitor_now's, runs_tab.table_rows', ...). The page's script asks
`GET lwb-stamp/<view>?key=<the run or job it shows>`, only while the view's tab is shown and the browser tab is
visible, and clicks the view's hidden redraw button when the stamp differs from the one it last redrew at; the
redraw still sends only the outputs whose keys changed.

Why not gr.Timer: each tick is a Gradio event (the queue's round trip on the server, a state update in the page's
client), and three always-on timers cost a 2-core box a third of a training run's speed with one page open
(README, "The UI's live path"). A stamp request is one small HTTP GET answered here, before Gradio's routes, and
an idle page sends no Gradio event at all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from app.login_guard import ASGIApp, Receive, Scope, Send

PREFIX = "/lwb-stamp/"
POKE_CLASS = "lwb-poke"  # the hidden redraw buttons (app/server.py's CSS hides them)


@dataclass(frozen=True)
class LiveView:
    """One live view: what its stamp is computed from, and where the page finds the parts the script needs."""

    name: str  # the URL segment
    panel: str  # elem_id of the tab whose panel must be shown for the page to ask
    poke: str  # elem_id of the hidden button whose click redraws the view
    key_from: str | None  # elem_id of the dropdown naming the run or job the view shows; None: the view has none
    every_s: float  # how often the page asks while the panel is shown
    keys: Callable[[str | None], Any]  # the redraw's keys for that run or job (a repr-able value)
    next_s: Callable[[], float] | None = None  # a shorter or longer interval for now (e.g. fast while a job runs)


def stamp(value: Any) -> str:
    return hashlib.blake2b(repr(value).encode(), digest_size=8).hexdigest()


class LiveViews:
    """The page's live views: tabs register theirs while the page is built; the route and the script read them."""

    def __init__(self) -> None:
        self.views: dict[str, LiveView] = {}

    def add(self, view: LiveView) -> None:
        if view.name in self.views:
            raise ValueError(f"live view {view.name!r} registered twice")
        self.views[view.name] = view

    def answer(self, name: str, key: str | None) -> dict[str, Any] | None:
        """{stamp, next}: the view's stamp for `key` and when to ask again; None for a view that is not registered."""
        view = self.views.get(name)
        if view is None:
            return None
        every = view.next_s() if view.next_s else view.every_s
        return {"stamp": stamp(view.keys(key or None)), "next": every}

    def script(self) -> str:
        """The page's poller: one loop per view, asking only while its panel is shown and the browser tab is visible."""
        specs = [
            {"name": v.name, "panel": v.panel, "poke": v.poke, "key": v.key_from, "every": v.every_s}
            for v in self.views.values()
        ]
        return POLLER_JS.replace("__VIEWS__", json.dumps(specs))


# A panel Gradio hides (a tab not selected) has no layout box: checkVisibility() is false for it and its children.
# A failed or refused request (a server restart, a login that expired) is retried at the view's interval; so is one
# with no answer after 10 s, so that a request the network or the server dropped never stops a view's loop.
POLLER_JS = """() => {
  const views = __VIEWS__;
  const ASK_TIMEOUT_MS = 10000;
  const giveUpAfter = (ms) => {  // AbortSignal.timeout where the browser has it (Chrome 103, Firefox 100, Safari 16)
    if (AbortSignal.timeout) return AbortSignal.timeout(ms);
    const c = new AbortController();
    setTimeout(() => c.abort(), ms);
    return c.signal;
  };
  const shown = (id) => { const el = document.getElementById(id); return !!el && el.checkVisibility(); };
  const keyOf = (id) => id ? (document.querySelector('#' + id + ' input')?.value ?? '') : '';
  for (const v of views) {
    let drawnAt = null;
    const ask = async () => {
      let wait = v.every;
      try {
        if (!document.hidden && shown(v.panel)) {
          const key = keyOf(v.key);
          const url = 'lwb-stamp/' + v.name + '?key=' + encodeURIComponent(key);
          const r = await fetch(url, {cache: 'no-store', signal: giveUpAfter(ASK_TIMEOUT_MS)});
          if (r.ok) {
            const a = await r.json();
            wait = a.next;
            const at = key + '|' + a.stamp;
            if (at !== drawnAt) { drawnAt = at; document.getElementById(v.poke)?.click(); }
          }
        }
      } catch (e) { /* the server is restarting: ask again later */ }
      setTimeout(ask, 1000 * wait);
    };
    ask();
  }
}"""


class StampRoute:
    """ASGI middleware: answers GET /lwb-stamp/<view>?key=... with the view's stamp, hands everything else on."""

    def __init__(self, app: ASGIApp, live: LiveViews) -> None:
        self.app, self.live = app, live

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        key = (query.get("key") or [""])[0]
        answer = await run_in_threadpool(self.live.answer, path[len(PREFIX) :], key)  # reads the registry's SQLite
        if answer is None:
            response = JSONResponse({"error": "no such view"}, status_code=404)
        else:
            response = JSONResponse(answer, headers={"Cache-Control": "no-store"})
        await response(scope, receive, send)
