"""The job functions each kind of worker runs, and nothing else.

rq imports whatever function path a job names, and its callbacks' paths too; the JSON
serializer does not stop a job from naming `os.system`. Whoever can write a job into a
queue could then run code on the worker that takes it: the report worker holds the App
key. So each worker uses a Job class that resolves only the paths listed for its role;
any other path fails the job with a message naming it, before anything is imported.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rq.job import Job
from rq.utils import import_attribute

REPORT_QUEUE = "report"  # beside the server: the only worker that holds the App key
# Names of runners' workers, so that their Redis ACL user can be held to those keys
# (deploy/redis-acl.sh). Runners enqueue no job: the server's collector reports for them.
RUNNER_WORKER_PREFIX = "runner-"
# What the server and runners enqueue (app/server.py, app/report.py, workers/verify.py).
VERIFY_FUNCTION = "mlx_verify.workers.verify.run_verify"
RUNNER_FUNCTIONS = frozenset({VERIFY_FUNCTION})
RUNNER_CALLBACKS = frozenset({"mlx_verify.workers.verify.on_verify_failure"})
REPORT_FUNCTIONS = frozenset({
    f"mlx_verify.app.report.{name}" for name in (
        "handle_event", "verify_started", "verify_finished", "verify_requeued", "verify_failed")
})
# The report job lived in workers/ until 2026-12 (it holds the App key, so it moved to
# app/): jobs queued under the old paths still run, as the same functions.
# Since 2026-12 the packages import as mlx_verify.*: jobs queued under the bare paths
# (app.report.*, workers.verify.*) run too.
RENAMED = {f"{old}.{name.rsplit('.', 1)[1]}": name for name in REPORT_FUNCTIONS
           for old in ("workers.report", "app.report")}
RUNNER_RENAMED = {"workers.verify.run_verify": VERIFY_FUNCTION}
RUNNER_CALLBACKS_RENAMED = {"workers.verify.on_verify_failure":
                            "mlx_verify.workers.verify.on_verify_failure"}


def current_name(func_name: str | None) -> str:
    """A job function's path under the current package names."""
    name = func_name or ""
    return RENAMED.get(name) or RUNNER_RENAMED.get(name) or name
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
    callbacks_renamed: dict[str, str] = {}

    @property
    def func(self) -> Any:
        name = self.renamed.get(self.func_name or "", self.func_name)
        if self.instance is not None or name not in self.functions:
            return _refuse("the job function", self.func_name, self.role)
        return import_attribute(name)

    def _callback(self, name: str | None, resolve: Any) -> Any:
        if name and name in self.callbacks_renamed:
            return import_attribute(self.callbacks_renamed[name])
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
    renamed = RUNNER_RENAMED
    callbacks_renamed = RUNNER_CALLBACKS_RENAMED


class ReportJob(AllowlistedJob):
    role = "report"
    functions = REPORT_FUNCTIONS
    callbacks = REPORT_CALLBACKS
    renamed = RENAMED


# ---- what crosses the queue: the verify spec to runners, the outcome back -------------

JOB_SPEC_VERSION = 1
SHA = r"^[0-9a-f]{40}$"


class JobSpecError(Exception):
    """A job's arguments do not match the model this worker reads (one line)."""


class Versioned(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Specs and outcomes queued before this field existed (2026-12) have the v1 shape.
    version: int = JOB_SPEC_VERSION
    # the versions this model reads: each older shape is a subset of the newest one
    readable_versions: ClassVar[tuple[int, ...]] = (JOB_SPEC_VERSION,)

    @classmethod
    def read(cls, data: Any, what: str) -> Any:
        """Validate data that came through the queue; JobSpecError names the first
        problem in one line."""
        if not isinstance(data, dict):
            raise JobSpecError(f"{what}: expected a JSON object, got {type(data).__name__}")
        version = data.get("version", 1)  # no version field: the first shape
        if version not in cls.readable_versions:
            readable = " or ".join(str(v) for v in cls.readable_versions)
            raise JobSpecError(f"{what} has version {repr(version)[:20]}; this worker reads "
                               f"version {readable} (server and runners must run the "
                               "same release; then re-run the check)")
        data = {**data, "version": version}
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "(top level)"
            raise JobSpecError(f"{what}: {where[:80]}: {first['msg'][:120]} "
                               f"({e.error_count()} problem(s))") from None


class RequestSpec(BaseModel):
    """mlx_verify.app.commands.VerifyRequest.to_dict()."""
    model_config = ConfigDict(extra="forbid")
    model_types: list[str] = Field(default_factory=list, max_length=64)
    hub: list[str] = Field(default_factory=list, max_length=16)
    checks: list[str] = Field(default_factory=list, max_length=32)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    source: Literal["auto", "command"] = "auto"


class VerifySpec(Versioned):
    """The argument of workers.verify.run_verify, built by app.report.start_verify."""
    job_id: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,128}$")
    repo: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,100}/[A-Za-z0-9_.\-]{1,100}$")
    number: int = Field(ge=1)
    sha: str = Field(pattern=SHA)
    base_sha: str | None = Field(default=None, pattern=SHA)
    baseline: bool = False
    changed_files: list[str] = Field(default_factory=list, max_length=3000)
    request: RequestSpec = Field(default_factory=RequestSpec)
    auto_model_types: list[str] | None = None
    max_model_types: int = Field(default=24, ge=0)


class CrossCheck(BaseModel):
    """Final logits of one variant of a model_type, measured outside the sandbox
    (workers/crosscheck.py): transformers here, MLX as data from a sandboxed capture."""
    model_config = ConfigDict(extra="forbid")
    model_type: str = Field(max_length=100)
    variant: str = Field(default="default", max_length=100)
    verdict: Literal["pass", "fail", "error"]
    # the sandboxed layers verdict, or "omitted": the results have no row for a variant
    # the runner builds (workers/verify.py cross_check_all)
    claimed: str | None = Field(default=None, max_length=16)
    rel_l2: float | None = None
    bound: float
    dtype: str = Field(default="float32", max_length=16)
    tokens: int = 0
    top1_agreement: float | None = None
    reason: str | None = Field(default=None, max_length=600)
    config_origin: str | None = Field(default=None, max_length=200)
    # wall time of the model_type's whole cross-check (its variants share one capture)
    duration_s: float | None = None

    @property
    def contradicts(self) -> bool:
        """The sandboxed results claimed a pass this measurement does not confirm, or left
        out a variant this measurement fails (one the runner could not measure either
        hides nothing)."""
        if self.claimed == "omitted":
            return self.verdict == "fail"
        return self.claimed == "pass" and self.verdict != "pass"


# v2 (2026-12): cross_checks. A v1 outcome has none and still reads.
OUTCOME_VERSION = 2


class VerifyOutcome(Versioned):
    """The outcome argument of app.report.verify_finished (see workers.verify)."""
    version: int = OUTCOME_VERSION
    readable_versions: ClassVar[tuple[int, ...]] = (1, OUTCOME_VERSION)
    status: Literal["done", "nothing", "stale", "timeout", "crashed"]
    results: dict[str, Any] | None = None  # checks.schema.Results, validated by the reader
    errors: dict[str, str] = Field(default_factory=dict)
    skipped: list[str] = Field(default_factory=list)
    planned: list[str] = Field(default_factory=list)
    model_types: list[str] = Field(default_factory=list)
    truncated: bool = False
    plan: dict[str, Any] | None = None  # workers.planning.Plan.to_dict()
    timeout_s: int | None = None
    stderr_tail: str | None = None
    reason: str | None = None
    duration_s: float | None = None
    base_sha: str | None = None
    base_status: str | None = None
    base_results: dict[str, Any] | None = None
    base_errors: dict[str, str] = Field(default_factory=dict)
    # final logits of each claimed-pass variant, measured by the runner outside the sandbox
    cross_checks: list[CrossCheck] = Field(default_factory=list, max_length=1024)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)
