"""The job functions each kind of worker runs, and nothing else.

rq imports whatever function path a job names, and its callbacks' paths too; the JSON
serializer does not stop a job from naming `os.system`. Whoever can write a job into a
queue could then run code on the worker that takes it: the report worker holds the App
key. So each worker uses a Job class that resolves only the paths listed for its role;
any other path fails the job with a message naming it, before anything is imported.
"""

from __future__ import annotations

from typing import Any

from rq.job import Job
from rq.utils import import_attribute

REPORT_QUEUE = "report"  # beside the server: the only worker that holds the App key
# What the server and runners enqueue (app/server.py, app/report.py, workers/verify.py).
RUNNER_FUNCTIONS = frozenset({"workers.verify.run_verify"})
RUNNER_CALLBACKS = frozenset({"workers.verify.on_verify_failure"})
REPORT_FUNCTIONS = frozenset({
    "app.report.handle_event", "app.report.verify_started", "app.report.verify_finished",
    "app.report.verify_requeued", "app.report.verify_failed",
})
# The report job lived in workers/ until 2026-12 (it holds the App key, so it moved to
# app/): jobs queued under the old paths still run, as the same functions.
RENAMED = {f"workers.report.{name.rsplit('.', 1)[1]}": name for name in REPORT_FUNCTIONS}
REPORT_CALLBACKS: frozenset[str] = frozenset()


class JobNotAllowed(Exception):
    """A job names a function or callback this worker does not run."""


def _refuse(what: str, name: str | None, role: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> None:
        raise JobNotAllowed(f"this {role} worker runs only its own jobs; refused {what} "
                            f"{name!r}")

    return refused


class AllowlistedJob(Job):
    role = "no"
    functions: frozenset[str] = frozenset()
    callbacks: frozenset[str] = frozenset()
    renamed: dict[str, str] = {}

    @property
    def func(self) -> Any:
        name = self.renamed.get(self.func_name or "", self.func_name)
        if self.instance is not None or name not in self.functions:
            return _refuse("the job function", self.func_name, self.role)
        return import_attribute(name)

    def _callback(self, name: str | None, resolve: Any) -> Any:
        if name and name not in self.callbacks:
            return _refuse("the callback", name, self.role)
        return resolve.fget(self)

    @property
    def success_callback(self) -> Any:
        return self._callback(self._success_callback_name, Job.success_callback)

    @property
    def failure_callback(self) -> Any:
        return self._callback(self._failure_callback_name, Job.failure_callback)

    @property
    def stopped_callback(self) -> Any:
        return self._callback(self._stopped_callback_name, Job.stopped_callback)


class RunnerJob(AllowlistedJob):
    role = "runner"
    functions = RUNNER_FUNCTIONS
    callbacks = RUNNER_CALLBACKS


class ReportJob(AllowlistedJob):
    role = "report"
    functions = REPORT_FUNCTIONS
    callbacks = REPORT_CALLBACKS
    renamed = RENAMED
