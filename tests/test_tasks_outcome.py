"""What a task's outcome says: the session's web UI link and the Markdown block (pure functions)."""

from __future__ import annotations

from twisted.internet.task import Clock

from opencoderouter.agent_sessions import web_path
from opencoderouter.registry import Backend, Naming, Registry, Sighting
from opencoderouter.tasks.journal import TaskRecord
from opencoderouter.tasks.outcome import outcome_block, web_ui_link


def backend_for(directory: str) -> Backend:
    registry = Registry(Clock(), stale_after=1e9, naming=Naming(username="alice", os_user="alice"))
    return registry.record(Sighting(30000, directory, "1.18.33"))


def test_the_link_opens_the_session_in_the_web_ui_through_the_localhost_name_on_the_routers_port():
    link = web_ui_link(backend_for("/tmp/ocfacts/a/Proj-One"), 8080, "ses_x")
    assert link == "http://proj-one-alice.localhost:8080/L3RtcC9vY2ZhY3RzL2EvUHJvai1PbmU/session/ses_x"


def test_a_directory_that_is_not_utf_8_still_gets_the_web_uis_own_link():
    directory = "/home/alice/caf\udce9"  # a non-UTF-8 byte, as a backend's JSON may hand it over
    link = web_ui_link(backend_for(directory), 8080, "ses_x")
    assert link == "http://caf-alice.localhost:8080" + web_path(directory, "ses_x")


def test_the_block_says_when_the_task_finished_in_rfc_3339_and_unknown_when_it_did_not():
    record = TaskRecord(id="t1", source="api", created=0.0, state="done", started=1796173470.0,
                        finished=1796173475.3)
    assert "- finished: 2026-12-02T01:04:35Z\n" in outcome_block(record)
    assert "- duration: 5.3 s\n" in outcome_block(record)
    record.finished = None
    assert "- finished: unknown\n" in outcome_block(record)
