"""How the suite spreads over pytest-xdist workers (``-n N --dist loadgroup``, as ``make test`` runs it).

- A test marked ``long`` (minutes of real time: the 150 s SSE stream, the 130 s model turn, the 120 s
  mDNS record expiry) is a work unit of its own. Long tests are handed out first, one to a worker,
  and that worker is told to end after it: nothing queues behind a two-minute test. (An xdist worker
  starts a test only once it knows the next one or that there is none, so "no more work for now"
  would leave it idle; "stop after this one" lets it start at once.) So run with one worker per long
  test more than you want for the rest. A long test in a module with a module-scoped fixture gets
  that fixture on its own worker too.
- The tests of a module that share a module-scoped fixture (the real OpenCode pipeline, the mDNS
  namespaces, a router stack) come next, each module as one unit on one worker, so the fixture is set
  up once; so do tests marked ``xdist_group("name")``, each group as one unit.
- Everything else follows in file order, one test at a time to whichever worker is free.

The workers collect the tests; the controller that hands them out sees only their node ids. xdist's
own ``loadgroup`` passes the group by appending ``@name`` to the node id, which pytest 9.2 no longer
lets it do (pytest-dev/pytest-xdist#1386: the marks are then silently ignored), and it knows nothing
of fixtures. So the workers write each grouped test's unit to a JSON file (the same content from every
worker) and the controller reads it when it schedules. Without ``--dist loadgroup`` nothing is reordered or grouped.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from xdist.remote import Producer
from xdist.scheduler import LoadScopeScheduling
from xdist.workermanage import WorkerController

#: Where the workers write the units (set by the controller, inherited by the workers it starts).
UNITS_FILE = "OPENCODEROUTER_TEST_UNITS"
#: The unit name of a ``long`` test starts with this.
LONG_UNIT = "long:"


def unit_of(item: pytest.Item) -> str | None:
    """The work unit an item belongs to (None: a unit of its own, spread freely)."""
    if item.get_closest_marker("long") is not None:
        return LONG_UNIT + item.nodeid
    group = item.get_closest_marker("xdist_group")
    if group is not None:
        return "group:" + str(group.args[0] if group.args else group.kwargs.get("name", "default"))
    if _uses_a_module_fixture(item):
        return "module:" + item.nodeid.split("::", 1)[0]
    return None


def _uses_a_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)  # what pytest resolved for the item (no public accessor)
    if info is None:
        return False
    return any(definitions[-1].scope == "module" for definitions in info.name2fixturedefs.values() if definitions)


def _rank(item: pytest.Item) -> int:
    unit = unit_of(item)
    if unit is None:
        return 2
    return 0 if unit.startswith(LONG_UNIT) else 1


def order_and_publish(items: list[pytest.Item]) -> None:
    """In a worker: long tests first, then the groups, then the rest (stable); write the units for the controller."""
    path = os.environ.get(UNITS_FILE)
    if path is None:
        return
    items.sort(key=_rank)
    units = {item.nodeid: unit for item in items if (unit := unit_of(item)) is not None}
    scratch = f"{path}.{os.getpid()}"
    Path(scratch).write_text(json.dumps(units))
    os.replace(scratch, path)  # every worker writes the same content; a reader never sees half of it


class LongTestsOwnWorker(LoadScopeScheduling):
    """Units as the workers published them, handed out in collection order; a long unit's worker ends with it."""

    def __init__(self, config: pytest.Config, log: Producer | None = None) -> None:
        super().__init__(config, log)
        self.units: dict[str, str] | None = None

    def _split_scope(self, nodeid: str) -> str:
        if self.units is None:
            self.units = json.loads(Path(os.environ[UNITS_FILE]).read_text())
        return self.units.get(nodeid, nodeid)

    def _assign_work_unit(self, node: WorkerController) -> None:
        scope = next(iter(self.workqueue))
        super()._assign_work_unit(node)
        others = [other for other in self.nodes if other is not node and not other.shutting_down]
        if scope.startswith(LONG_UNIT) and others:
            node.shutdown()  # it runs the long test, then ends; the other workers share the rest


class SchedulingPlugin:
    """Registered by conftest in the controller when pytest-xdist runs with ``--dist loadgroup``."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="ocr-test-units-"))
        os.environ[UNITS_FILE] = str(self.folder / "units.json")

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Producer) -> LongTestsOwnWorker:
        """Our scheduler instead of xdist's LoadGroupScheduling."""
        config.option.loadscopereorder = False  # the workers' collection order is the order of the work
        return LongTestsOwnWorker(config, log)

    def pytest_unconfigure(self) -> None:
        """Remove the units file."""
        shutil.rmtree(self.folder, ignore_errors=True)
        os.environ.pop(UNITS_FILE, None)
