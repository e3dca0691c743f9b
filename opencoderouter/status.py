"""``opencoderouter-status``: what every agent on this machine is doing, as a table in the terminal.

It asks the router for ``GET /api/agents`` and prints one line per backend (state, sessions,
project) and, under it, one line per session that is not idle: what it waits for ("needs you:
bash: rm -rf build/"), its error, its todo progress, and the link that opens it in the OpenCode web
UI. ``--json`` prints the API's answer; ``--watch`` follows the router's event stream
(``/api/events``) and prints the table again whenever something changes. Over SSH
(``ssh devbox opencoderouter-status``) the links use ``{project}-{user}.localhost:PORT``, which a
browser on your laptop reaches through ``ssh -L PORT:localhost:PORT devbox``.

A plain command-line client: blocking HTTP from the standard library, no reactor.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import IO, Any
from urllib.parse import urlsplit

from .backoff import doubling_backoff
from .dispatch import router_authorization
from .dispatcher import DEFAULT_ROUTER

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_REFUSED = 3
EXIT_UNREACHABLE = 4

#: Backends most in need of a person first.
_ORDER = {"needs_you": 0, "error": 1, "working": 2, "idle": 3, "unknown": 4}
_MARK = {"needs_you": "!", "error": "x", "working": ">", "retrying": ">", "idle": " "}
_TITLE = 48
#: Events of /api/events after which the table may have changed.
_CHANGES = frozenset({"snapshot", "agents", "added", "updated", "removed"})
_CLEAR = "\x1b[H\x1b[2J"
#: ``--watch`` asks a router that went away again after 1 s, doubling to 5 s.
_RECONNECT_BACKOFF = doubling_backoff(1.0, 5.0)


class StatusError(Exception):
    """The router could not be asked: the exit code and a sentence for the user."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


# -- the table ----------------------------------------------------------------------------------------
def _ago(text: Any, now: float) -> str:
    if not isinstance(text, str):
        return ""
    try:
        then = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return ""
    seconds = max(0, int(now - then))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 172800:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} days ago"


def _clean(text: Any, limit: int | None = None) -> str:
    """A backend's string made safe for a terminal: no control characters (escape sequences), bounded."""
    value = "".join(c if c.isprintable() else " " for c in str(text if text is not None else ""))
    if limit is not None and len(value) > limit:
        value = value[: limit - 1] + "…"
    return value


def _home(path: Any) -> str:
    text = _clean(path)
    home = os.path.expanduser("~")
    return "~" + text[len(home):] if home != "/" and (text == home or text.startswith(home + "/")) else text


def _session_line(session: dict[str, Any], now: float) -> str:
    status = str(session.get("status") or "idle")
    waiting = [p.get("asking") for p in session.get("permissions") or [] if isinstance(p, dict)] + \
        [q.get("asking") for q in session.get("questions") or [] if isinstance(q, dict)]
    if waiting:
        what = "needs you: " + "; ".join(_clean(w, 120) for w in waiting)
        mark = _MARK["needs_you"]
    elif status == "error":
        error = session.get("last_error") or {}
        what = f"error: {_clean(error.get('name'))}: {_clean(error.get('message'), 160)}"
        mark = _MARK["error"]
    elif status == "retrying":
        retry = session.get("retry") or {}
        what = f"retrying (attempt {_clean(retry.get('attempt'))}): {_clean(retry.get('message'), 120)}"
        mark = _MARK["retrying"]
    else:
        what, mark = status, _MARK.get(status, " ")
    todo = session.get("todo")
    if isinstance(todo, dict) and todo.get("total"):
        what += f" · todo {_clean(todo.get('done'))}/{_clean(todo.get('total'))}"
    title = _clean(session.get("title") or session.get("id"), _TITLE)
    parts = [f"  {mark} \"{title}\"", what, _ago(session.get("last_activity"), now)]
    if session.get("web_url"):
        parts.append(_clean(session["web_url"]))
    return "  ".join(part for part in parts if part)


def render(entries: list[dict[str, Any]], now: float, all_sessions: bool = False) -> str:
    """The table for ``GET /api/agents``'s answer, most urgent backends first."""
    entries = [e for e in entries if isinstance(e, dict)]
    if not entries:
        return "No OpenCode servers found by the router.\n"
    entries.sort(key=lambda e: (_ORDER.get(str((e.get("agents") or {}).get("state")), 5), str(e.get("slug"))))
    slug_width = max(5, min(28, max(len(_clean(e.get("slug"))) for e in entries)))
    labels = [_clean((e.get("agents") or {}).get("label") or "unknown", 40) for e in entries]
    state_width = max(5, max(len(label) for label in labels))
    lines = [f"{'AGENT':<{slug_width}}  {'STATE':<{state_width}}  {'SESSIONS':>8}  PROJECT"]
    totals = {"needs_you": 0, "working": 0, "errors": 0}
    for entry in entries:
        summary = entry.get("agents") or {}
        state = str(summary.get("state") or "unknown")
        label = _clean(summary.get("label") or state, 40)
        project = _home(entry.get("project_path"))
        if state == "unknown" and summary.get("reason"):
            project += f"  ({_clean(summary['reason'], 100)})"
        count = summary.get("sessions") if state != "unknown" else "-"
        lines.append(f"{_clean(entry.get('slug'), 28):<{slug_width}}  {label:<{state_width}}  {_clean(count):>8}  "
                     f"{project}")
        for key in totals:
            value = summary.get(key)
            totals[key] += value if isinstance(value, int) and state != "unknown" else 0
        for session in entry.get("sessions") or []:
            if isinstance(session, dict) and (all_sessions or session.get("status") != "idle"
                                              or session.get("needs_you")):
                lines.append(_session_line(session, now))
    noun = "backend" if len(entries) == 1 else "backends"
    lines.append(f"{len(entries)} {noun}: {totals['needs_you']} waiting for you, {totals['working']} working, "
                 f"{totals['errors']} failed")
    return "\n".join(lines) + "\n"


# -- talking to the router ---------------------------------------------------------------------------------
class Router:
    """The router's base URL and credentials; blocking requests."""

    def __init__(self, url: str, authorization: str | None, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        self.url = url.rstrip("/")
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.authorization = authorization
        self.timeout = timeout

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=timeout)

    def _headers(self, accept: str) -> dict[str, str]:
        headers = {"Accept": accept, "User-Agent": "opencoderouter-status"}
        if self.authorization:
            headers["Authorization"] = self.authorization
        return headers

    def _check(self, response: http.client.HTTPResponse, path: str) -> None:
        if response.status in (401, 403):
            raise StatusError(EXIT_REFUSED, f"the router at {self.url} refused the credentials ({response.status}) "
                                            "for " + path + ": pass --token-file, OPENCODEROUTER_TOKEN or "
                                            "user:password@ in --router")
        if response.status != 200:
            raise StatusError(EXIT_UNREACHABLE, f"the router at {self.url} answered {response.status} to {path}")

    def agents(self) -> list[dict[str, Any]]:
        """``GET /api/agents``."""
        connection = self._connect(self.timeout)
        try:
            connection.request("GET", "/api/agents", headers=self._headers("application/json"))
            response = connection.getresponse()
            self._check(response, "/api/agents")
            body = json.loads(response.read(16 * 1024 * 1024))
        except (OSError, http.client.HTTPException, ValueError) as error:
            raise StatusError(EXIT_UNREACHABLE, f"cannot ask the router at {self.url}: {error}") from None
        finally:
            connection.close()
        if not isinstance(body, list):
            raise StatusError(EXIT_UNREACHABLE, f"the router at {self.url} answered /api/agents with something else")
        return body

    def events(self, idle_timeout: float = 45.0) -> Iterator[str]:
        """The names of ``/api/events`` events as they come (the router sends a comment every 15 s)."""
        connection = self._connect(idle_timeout)
        try:
            connection.request("GET", "/api/events", headers=self._headers("text/event-stream"))
            response = connection.getresponse()
            self._check(response, "/api/events")
            name = "message"
            while True:
                line = response.readline(1 << 20)
                if not line:
                    return
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                if text.startswith("event:"):
                    name = text[6:].strip()
                elif text == "":
                    yield name
                    name = "message"
        except (OSError, http.client.HTTPException) as error:
            raise StatusError(EXIT_UNREACHABLE, f"lost the router's event stream at {self.url}: {error}") from None
        finally:
            connection.close()


def watch(router: Router, show: Callable[[list[dict[str, Any]]], None], err: IO[str],
          sleep: Callable[[float], None] = time.sleep, rounds: int | None = None) -> None:
    """Show the agents now and after every change, reconnecting to a router that goes away."""
    attempt, shown_error = 0, None
    while rounds is None or rounds > 0:
        if rounds is not None:
            rounds -= 1
        try:
            for name in router.events():
                if name in _CHANGES:
                    show(router.agents())
                    attempt, shown_error = 0, None
        except StatusError as error:
            if error.exit_code == EXIT_REFUSED:
                raise
            if shown_error != error.message:
                err.write(f"opencoderouter-status: {error.message}; retrying\n")
                err.flush()
                shown_error = error.message
        sleep(_RECONNECT_BACKOFF(attempt))
        attempt += 1


# -- the command ----------------------------------------------------------------------------------------------
def _router_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not a router URL (e.g. http://127.0.0.1:8080)")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``opencoderouter-status``."""
    parser = argparse.ArgumentParser(
        prog="opencoderouter-status",
        description="Show what every OpenCode agent behind the router is doing: who needs you, who works, "
                    "who failed.",
        epilog="Exit codes: 0 shown, 2 bad input, 3 the router refused the credentials, 4 router unreachable.",
    )
    parser.add_argument("--router", type=_router_url, default=os.environ.get("OPENCODEROUTER_URL", DEFAULT_ROUTER),
                        help=f"router URL [$OPENCODEROUTER_URL or {DEFAULT_ROUTER}]")
    parser.add_argument("--token-file", help="file whose first line is the router's access token "
                        "(default: $OPENCODEROUTER_TOKEN; or put user:password@ in --router)")
    parser.add_argument("--json", action="store_true", help="print GET /api/agents as JSON (with --watch: one line "
                        "per change)")
    parser.add_argument("--watch", action="store_true", help="follow the router and print again on every change")
    parser.add_argument("--all", action="store_true", help="list idle sessions too")
    return parser


def _authorization(args: argparse.Namespace) -> tuple[str, str | None]:
    try:
        return router_authorization(args.router, args.token_file)
    except ValueError as error:
        raise StatusError(EXIT_BAD_INPUT, str(error)) from None


def main(argv: list[str] | None = None, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """``opencoderouter-status``: returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        url, authorization = _authorization(args)
        router = Router(url, authorization)
        terminal = out.isatty() and not args.json

        def show(entries: list[dict[str, Any]]) -> None:
            if args.json:
                out.write(json.dumps(entries) + "\n")
            else:
                table = render(entries, time.time(), all_sessions=args.all)
                if terminal and args.watch:
                    stamp = datetime.now().strftime("%H:%M:%S")
                    table = f"{_CLEAR}{table}updated {stamp}, following {router.url} (Ctrl-C to stop)\n"
                elif args.watch:
                    table += "\n"
                out.write(table)
            out.flush()

        if not args.watch:
            show(router.agents())
            return EXIT_OK
        last: list[str] = []

        def show_changed(entries: list[dict[str, Any]]) -> None:
            text = json.dumps(entries, sort_keys=True)
            if last != [text]:
                last[:] = [text]
                show(entries)

        watch(router, show_changed, err)
        return EXIT_OK
    except StatusError as error:
        err.write(f"opencoderouter-status: {error.message}\n")
        return error.exit_code
    except KeyboardInterrupt:
        return EXIT_OK


def console_main() -> None:
    """Entry point of the console script."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
