"""Autodispatch inside the router: task sources → the right agent → the outcome back where the task came from.

``service`` (the TaskService, sources' protocol), ``journal`` (exactly once, in SQLite), ``folder``
(``--tasks-dir``), ``ticktick`` (``--ticktick-token-file``), ``budget`` (a request budget),
``outcome`` (what is written back).
"""
