"""``opencoderouter-dispatch``: hand a coding task to the right OpenCode through the router, follow it to the end.

The command line around :class:`~.dispatcher.Dispatcher` (the flow) and :func:`~.task_file.parse_task`
(the task format): flags, the router's credentials, signals, what is printed and the exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import task
from twisted.internet.defer import Deferred

from .config import parse_duration
from .dispatcher import DEFAULT_ROUTER, Dispatcher, Options, Result
from .task_file import EXIT_BAD_INPUT, EXIT_UNREACHABLE, PERMISSION_REPLIES, DispatchError, parse_task


def split_credentials(router: str) -> tuple[str, str | None]:
    """``http://user:pass@host:port`` → (``http://host:port``, ``Basic ...``); no user info → (router, None)."""
    parts = urlsplit(router)
    if parts.username is None:
        return router, None
    from base64 import b64encode
    from urllib.parse import unquote

    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    return parts._replace(netloc=netloc).geturl(), "Basic " + b64encode(credentials).decode("ascii")


def _duration(text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration")
    return value


def _router_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not a router URL (e.g. http://127.0.0.1:8080)")
    return text.rstrip("/")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``opencoderouter-dispatch``."""
    parser = argparse.ArgumentParser(
        prog="opencoderouter-dispatch",
        description="Dispatch a coding task to the project's OpenCode through OpenCodeRouter and follow it to the end.",
        epilog="Exit codes: 0 done, 1 the session errored, 2 bad input, 3 project not found, "
               "4 router or backend unreachable, 124 timeout, 130 interrupted.",
    )
    parser.add_argument("task", nargs="?", default="-",
                        help="task file (YAML front matter + prompt); '-' or none: stdin")
    parser.add_argument("--project", help="project name or path (overrides the front matter)")
    parser.add_argument("--model", help="provider/model (overrides the front matter)")
    parser.add_argument("--agent", help="agent (default: the server's default agent, else build)")
    parser.add_argument("--title", help="session title (default: the prompt's first line)")
    parser.add_argument("--router", type=_router_url, default=DEFAULT_ROUTER, help=f"router URL [{DEFAULT_ROUTER}]")
    parser.add_argument("--token-file", help="file whose first line is the router's access token "
                        "(default: $OPENCODEROUTER_TOKEN; or put user:password@ in --router)")
    parser.add_argument("--permissions", choices=PERMISSION_REPLIES,
                        help="answer to the agent's permission requests [the task's 'permissions', else reject]")
    parser.add_argument("--timeout", type=_duration, help="abort the session after this long (5m, 1h30m) and exit 124 "
                        "[the task's 'timeout', else none]")
    parser.add_argument("--reconnect-timeout", type=_duration, default=30.0,
                        help="how long to try to regain a lost event stream before exiting 4 [30s]")
    parser.add_argument("--quiet", action="store_true", help="do not print the answer's text")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end (implies --quiet)")
    return parser


def _read_task(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    if args.task == "-":
        if sys.stdin.isatty():
            parser.error("give a task file, or pipe the task on stdin")
        return sys.stdin.read()
    try:
        with open(args.task, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise DispatchError(EXIT_BAD_INPUT, f"cannot read the task file {args.task!r}: {error}", "bad_input") from None


def router_authorization(router: str, token_file: str | None) -> tuple[str, str | None]:
    """The router URL without user info, and the Authorization value for it (the clients' shared rule).

    A token file wins, then user info in the URL (Basic), then ``OPENCODEROUTER_TOKEN``. Raises
    ValueError with a sentence when the token file cannot be read or is empty.
    """
    router, basic = split_credentials(router)
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as handle:
                token = handle.readline().strip()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read the token file {token_file!r}: {error}") from None
        if not token:
            raise ValueError(f"the token file {token_file!r} is empty")
        return router, f"Bearer {token}"
    token = os.environ.get("OPENCODEROUTER_TOKEN", "").strip()
    if basic is None and token:
        return router, f"Bearer {token}"
    return router, basic


def _authorization(args: argparse.Namespace) -> tuple[str, str | None]:
    try:
        return router_authorization(args.router, args.token_file)
    except ValueError as error:
        raise DispatchError(EXIT_BAD_INPUT, str(error)) from None


def main(argv: list[str] | None = None) -> int:
    """``opencoderouter-dispatch``: returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        the_task = parse_task(_read_task(parser, args), project=args.project, model=args.model, agent=args.agent,
                              title=args.title)
    except DispatchError as error:
        print(f"opencoderouter-dispatch: {error.message}", file=sys.stderr)
        if args.json:
            print(json.dumps(Result(None, error.status, {"name": "DispatchError", "message": error.message}, "", 0.0,
                                    error.exit_code).to_json()))
        return error.exit_code
    try:
        router, authorization = _authorization(args)
    except DispatchError as error:
        print(f"opencoderouter-dispatch: {error.message}", file=sys.stderr)
        return error.exit_code
    # Flags override the front matter.
    if args.permissions is not None:
        the_task.permissions = args.permissions
    if args.timeout is not None:
        the_task.timeout = args.timeout
    options = Options(router=router, quiet=args.quiet or args.json, reconnect_timeout=args.reconnect_timeout,
                      authorization=authorization)
    outcome: dict[str, Result] = {}

    def run(reactor: Any) -> Deferred[None]:
        dispatcher = Dispatcher(reactor, the_task, options)
        # After react() installed its handlers: SIGINT aborts the session before we exit.
        signal.signal(signal.SIGINT, lambda *_: reactor.callFromThread(dispatcher.interrupt))
        signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(dispatcher.interrupt))
        return dispatcher.run().addCallback(lambda result: outcome.update(result=result))

    try:
        task.react(run)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    result = outcome.get("result")
    if result is None:
        print("opencoderouter-dispatch: stopped before the dispatch ended", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(result.to_json()))
    return result.exit_code


def console_main() -> None:
    """Entry point of the console script."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
