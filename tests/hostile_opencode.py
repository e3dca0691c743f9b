"""A fake OpenCode whose ``/global/event`` is hostile, as a process (``python -m tests.hostile_opencode``).

``--hostile garbage`` sends random bytes (newlines included) forever; ``--hostile huge`` sends one
10 MB event, then heartbeats as if nothing happened. Everything else is the project's fake OpenCode.

    python -m tests.hostile_opencode --hostile garbage serve --port 30000 --directory DIR
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet import task
from twisted.web.server import NOT_DONE_YET, Request

from opencoderouter.testing import FakeOpenCode, main


def hostile_class(mode: str) -> type[FakeOpenCode]:
    """A FakeOpenCode whose global event stream behaves as ``mode`` says."""

    class Hostile(FakeOpenCode):
        def __init__(self, directory: str, **kwargs: Any) -> None:
            super().__init__(directory, **kwargs)
            self.route("GET", "/global/event", self._hostile)

        def _hostile(self, request: Request) -> int:
            request.setHeader(b"content-type", b"text/event-stream")
            if mode == "garbage":
                loop = task.LoopingCall(lambda: request.write(os.urandom(512) + b"\n\n"))
                loop.clock = self.clock
                loop.start(0.2)
                request.notifyFinish().addBoth(lambda _: loop.stop())
            else:
                request.write(b"data: ")
                for _ in range(160):
                    request.write(b"x" * 65536)
                request.write(b"\n\n")
                self.streams.append((request, True))
                request.notifyFinish().addBoth(lambda _: self.streams.remove((request, True)))
            return NOT_DONE_YET

    return Hostile


if __name__ == "__main__":
    arguments = sys.argv[1:]
    hostile = arguments[arguments.index("--hostile") + 1]
    del arguments[arguments.index("--hostile"):arguments.index("--hostile") + 2]
    sys.exit(main(arguments, server_class=hostile_class(hostile)))
