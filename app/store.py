"""The run store: every verify run and sweep result, the one place results are kept.

Bounded, because it shares a `noeviction` Redis with the webhook intake and the queues:
a run's results JSON over STORE_RESULTS_MAX_KB is not kept (the run records why), runs
older than STORE_TTL_DAYS go, and while all runs together take more than STORE_MAX_MB
the oldest go (sizes counted in `bytes`/`sizes`). Redis must persist (AOF) and must not
evict (deploy/ sets both).

Keys (prefix mlxv:store:):
  run:{id}             hash: meta (JSON, small), results (Results JSON), logs (text)
  idx:time             zset run id -> queued time (epoch seconds)
  idx:pr:{repo}#{n}    zset run id -> queued time, at most MAX_RUNS_PER_PR
  idx:mt:{model_type}  zset run id -> queued time
  prs                  zset {repo}#{n} -> time of the PR's latest run
  prs:repo:{repo} / prs:state:{state} / prs:verdict:{verdict}
                       zsets of the same members, for the PR list filters
  pr:{repo}#{n}        hash: repository, number, title, latest run id, head SHA, state,
                       verdict, updated
  sizes                hash run id -> bytes stored for it; bytes: their sum
  sweeps               zset sweep id -> time; at most MAX_SWEEPS kept
  sweep:{id}           hash: mlx_lm, transformers, options, created, runs (JSON
                       model_type -> run id)

A run's id is the verify job id (the Check Run's details_url points at
/dashboard/runs/{job_id}; an earlier attempt of a re-run job is kept as {job_id}.{n}) or
sweep-{sweep id}-{model_type}.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field

from mlx_verify.checks.schema import Results, check_verdicts, combine_verdicts
from mlx_verify.workers.jobs import CrossCheck

from .settings import load_store_limits

log = logging.getLogger("mlx-verify.store")

PREFIX = "mlxv:store:"
MAX_RUNS_PER_PR = 50
MAX_SWEEPS = 100  # ~110 model_types each: about 11,000 runs
LOGS_MAX_CHARS = 16_384
RUN_STATES = ("queued", "running", "done", "failed", "stale", "cancelled")
VERDICTS = ("pass", "fail", "error", "skip")
# the report job's mlxv:job:{id} state -> the store's run state
JOB_STATES = {"queued": "queued", "running": "running", "completed": "done",
              "failed": "failed", "superseded": "stale", "cancelled": "cancelled"}

State = Literal["queued", "running", "done", "failed", "stale", "cancelled"]


class Run(BaseModel):
    id: str
    kind: Literal["pr", "sweep", "manual"] = "pr"
    repository: str | None = None
    pr: int | None = None
    title: str | None = None
    head_sha: str | None = None
    # model_types, hub, checks, dtype, source, requested_by
    request: dict[str, Any] = Field(default_factory=dict)
    state: State = "queued"
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    results: Results | None = None
    logs: str = ""
    errors: dict[str, str] = Field(default_factory=dict)  # model_type -> why it could not run
    # final logits the runner measured outside the sandbox (workers/crosscheck.py)
    cross_checks: list[CrossCheck] = Field(default_factory=list)
    outcome: str | None = None  # the runner's status: done, timeout, crashed, stale, ...
    reason: str | None = None  # why a run failed, from the runner or the queue
    mlx_lm_tree: str | None = None  # sweeps: version, git SHA, path of the mlx-lm checked
    transformers_version: str | None = None
    sweep_id: str | None = None
    # A re-run reuses the job id (the Check Run links to it); earlier attempts are kept
    # as {job id}.{attempt} (see record_job).
    attempt: int = 1

    @property
    def verdict(self) -> str | None:
        verdicts = [] if self.results is None else [r.verdict for r in self.results.reports]
        verdicts += ["error"] * len(self.errors)
        # a claimed pass the runner's own measurement does not confirm is the PR's
        # failure, as in the Check Run (app/comment.py)
        verdicts += [c.verdict for c in self.cross_checks if c.contradicts]
        return combine_verdicts(verdicts) if verdicts else None

    def matrix(self) -> dict[str, dict[str, str]]:
        """model_type -> check -> verdict combined over variants (errors as "(run)")."""
        out: dict[str, dict[str, str]] = {}
        for report in self.results.reports if self.results else []:
            row: dict[str, str] = dict(check_verdicts([report]))
            if report.error:
                row["(run)"] = "error"
            out.setdefault(report.model_type, {}).update(row)
        for model_type in self.errors:
            out.setdefault(model_type, {})["(run)"] = "error"
        return out

    def model_types(self) -> list[str]:
        names = list(self.request.get("model_types") or [])
        names += [r.model_type for r in self.results.reports] if self.results else []
        names += list(self.errors)
        return list(dict.fromkeys(n for n in names if n))

    def meta(self) -> dict[str, Any]:
        """What list pages need, without the (large) results and logs."""
        data = self.model_dump(mode="json", exclude={"results", "logs"})
        data["verdict"] = self.verdict
        data["matrix"] = self.matrix()
        data["model_types"] = self.model_types()
        if self.results is not None:
            data["created_at"] = self.results.created_at
        return data


def _key(*parts: str) -> str:
    return PREFIX + ":".join(parts)


def pr_key(repository: str, number: int) -> str:
    return f"{repository}#{int(number)}"


def record_run(connection: redis.Redis, run: Run | dict[str, Any]) -> Run:
    """Write (or overwrite) one run and its index entries; trims the PR's oldest runs."""
    run = run if isinstance(run, Run) else Run.model_validate(run)
    limits = load_store_limits()
    if run.queued_at is None:
        run.queued_at = time.time()
    run.logs = run.logs[-LOGS_MAX_CHARS:]
    results = run.results.model_dump_json() if run.results is not None else ""
    if len(results) > limits.results_max_bytes:
        # Too large to keep: the run stays, with its verdicts in the meta (computed
        # before the results go) and the reason.
        log.warning("run store: results of %s not kept (%d bytes)", run.id, len(results))
        meta = run.meta()
        run.reason = (f"results not kept: {len(results)} bytes, over STORE_RESULTS_MAX_KB "
                      f"({limits.results_max_bytes // 1024})")
        meta["reason"] = run.reason
        results = ""
    else:
        meta = run.meta()
    score = run.queued_at
    text = json.dumps(meta)
    size = len(text) + len(results) + len(run.logs)
    key = _key("run", run.id)
    old = connection.hget(key, "meta")
    old_size = int(connection.hget(_key("sizes"), run.id) or 0)
    pipe = connection.pipeline()
    if old:  # model_types it no longer lists (a re-run reset its results) leave the index
        for model_type in set(json.loads(old).get("model_types", [])) - set(meta["model_types"]):
            pipe.zrem(_key("idx", "mt", model_type), run.id)
    pipe.hset(key, mapping={"meta": text, "results": results, "logs": run.logs})
    pipe.expire(key, limits.ttl_s)  # a backstop; _trim drops it (and its index entries)
    pipe.hset(_key("sizes"), run.id, size)
    pipe.incrby(_key("bytes"), size - old_size)
    pipe.zadd(_key("idx", "time"), {run.id: score})
    for model_type in meta["model_types"]:
        pipe.zadd(_key("idx", "mt", model_type), {run.id: score})
    pipe.execute()
    if run.repository and run.pr is not None:
        _update_pr(connection, run, meta)
    _trim(connection, limits.max_bytes, time.time() - limits.ttl_s, keep=run.id)
    return run


def _trim(connection: redis.Redis, max_bytes: int, oldest: float, keep: str) -> None:
    """Drop runs queued before `oldest`, then the oldest runs while all of them take more
    than max_bytes (never `keep`, the run just written)."""
    expired = _ids(connection.zrangebyscore(_key("idx", "time"), "-inf", f"({oldest}"))
    if expired:
        delete_runs(connection, [r for r in expired if r != keep])
    while int(connection.get(_key("bytes")) or 0) > max_bytes:
        batch = [r for r in _ids(connection.zrange(_key("idx", "time"), 0, 49)) if r != keep]
        if not batch:
            break
        delete_runs(connection, batch)


def stored_bytes(connection: redis.Redis) -> int:
    return int(connection.get(_key("bytes")) or 0)


def _update_pr(connection: redis.Redis, run: Run, meta: dict[str, Any]) -> None:
    key = pr_key(run.repository or "", run.pr or 0)
    connection.zadd(_key("idx", "pr", key), {run.id: run.queued_at})
    # The PR's row shows its latest run (by queue time); an older run finishing late
    # does not take over.
    latest = connection.zrevrange(_key("idx", "pr", key), 0, 0)
    latest_id = latest[0].decode() if latest else run.id
    existing = connection.hgetall(_key("pr", key))
    title = run.title or (existing.get(b"title") or b"").decode() or \
        (connection.get(_key("title", key)) or b"").decode() or None
    if latest_id == run.id:
        fields = {"repository": run.repository, "number": run.pr, "title": title or "",
                  "latest": run.id, "head_sha": run.head_sha or "", "state": run.state,
                  "verdict": meta["verdict"] or "", "updated": run.queued_at}
        pipe = connection.pipeline()
        pipe.hset(_key("pr", key), mapping=fields)
        pipe.zadd(_key("prs"), {key: run.queued_at})
        pipe.zadd(_key("prs", "repo", run.repository or ""), {key: run.queued_at})
        for state in RUN_STATES:
            pipe.zrem(_key("prs", "state", state), key)
        pipe.zadd(_key("prs", "state", run.state), {key: run.queued_at})
        for verdict in VERDICTS:
            pipe.zrem(_key("prs", "verdict", verdict), key)
        if meta["verdict"]:
            pipe.zadd(_key("prs", "verdict", meta["verdict"]), {key: run.queued_at})
        pipe.sadd(_key("repos"), run.repository or "")
        pipe.execute()
    elif title:
        connection.hset(_key("pr", key), "title", title)
    # Bounded per PR: the oldest runs beyond MAX_RUNS_PER_PR go, with their indexes.
    old = connection.zrange(_key("idx", "pr", key), 0, -(MAX_RUNS_PER_PR + 1))
    if old:
        delete_runs(connection, [o.decode() for o in old])


def delete_runs(connection: redis.Redis, run_ids: list[str]) -> None:
    metas = connection.pipeline()
    for run_id in run_ids:
        metas.hget(_key("run", run_id), "meta")
    sizes = connection.hmget(_key("sizes"), run_ids) if run_ids else []
    pipe = connection.pipeline()
    prs = set()
    for run_id, raw in zip(run_ids, metas.execute(), strict=True):
        meta = json.loads(raw) if raw else {}
        for model_type in meta.get("model_types", []):
            pipe.zrem(_key("idx", "mt", model_type), run_id)
        if meta.get("repository") and meta.get("pr") is not None:
            key = pr_key(meta["repository"], meta["pr"])
            prs.add(key)
            pipe.zrem(_key("idx", "pr", key), run_id)
        pipe.zrem(_key("idx", "time"), run_id)
        pipe.delete(_key("run", run_id))
        pipe.hdel(_key("sizes"), run_id)
    freed = sum(int(size or 0) for size in sizes)
    if freed:
        pipe.decrby(_key("bytes"), freed)
    pipe.execute()
    for key in prs:  # a PR none of whose runs is left leaves the PR list
        if not connection.zcard(_key("idx", "pr", key)):
            pipe = connection.pipeline()
            for zset in [_key("prs"), *(_key("prs", "state", s) for s in RUN_STATES),
                         *(_key("prs", "verdict", v) for v in VERDICTS)]:
                pipe.zrem(zset, key)
            repository = key.rsplit("#", 1)[0]
            pipe.zrem(_key("prs", "repo", repository), key)
            pipe.delete(_key("pr", key), _key("title", key))
            pipe.execute()


def get_run(connection: redis.Redis, run_id: str) -> Run | None:
    raw = connection.hmget(_key("run", run_id), ["meta", "results", "logs"])
    if raw[0] is None:
        return None
    meta = json.loads(raw[0])
    for derived in ("verdict", "matrix", "model_types", "created_at"):
        meta.pop(derived, None)
    run = Run.model_validate(meta)
    if raw[1]:
        run.results = Results.model_validate_json(raw[1])
    run.logs = (raw[2] or b"").decode()
    return run


def get_metas(connection: redis.Redis, run_ids: list[str]) -> list[dict[str, Any]]:
    """The small meta dicts of these runs, in order; missing runs are left out."""
    pipe = connection.pipeline()
    for run_id in run_ids:
        pipe.hget(_key("run", run_id), "meta")
    return [json.loads(raw) for raw in pipe.execute() if raw]


def get_run_ids(connection: redis.Redis, run_ids: list[str]) -> list[str]:
    """Those of run_ids that are stored."""
    pipe = connection.pipeline()
    for run_id in run_ids:
        pipe.exists(_key("run", run_id))
    return [r for r, found in zip(run_ids, pipe.execute(), strict=True) if found]


def _ids(raw: list[bytes]) -> list[str]:
    return [r.decode() for r in raw]


def recent_runs(connection: redis.Redis, offset: int = 0, limit: int = 50
                ) -> list[dict[str, Any]]:
    return get_metas(connection, _ids(connection.zrevrange(
        _key("idx", "time"), offset, offset + limit - 1)))


def runs_for_pr(connection: redis.Redis, repository: str, number: int,
                limit: int = MAX_RUNS_PER_PR) -> list[dict[str, Any]]:
    """Newest first."""
    return get_metas(connection, _ids(connection.zrevrange(
        _key("idx", "pr", pr_key(repository, number)), 0, limit - 1)))


def runs_for_model_type(connection: redis.Redis, model_type: str, offset: int = 0,
                        limit: int = 50) -> list[dict[str, Any]]:
    return get_metas(connection, _ids(connection.zrevrange(
        _key("idx", "mt", model_type), offset, offset + limit - 1)))


def count_runs(connection: redis.Redis) -> int:
    return int(connection.zcard(_key("idx", "time")))


def repositories(connection: redis.Redis) -> list[str]:
    return sorted(r.decode() for r in connection.smembers(_key("repos")))


def pr_list(connection: redis.Redis, repository: str | None = None, state: str | None = None,
            verdict: str | None = None, offset: int = 0, limit: int = 50
            ) -> tuple[list[dict[str, Any]], int]:
    """PRs by latest activity, newest first, filtered; (page of PR rows, total matching)."""
    sets = [_key("prs")]
    if repository:
        sets.append(_key("prs", "repo", repository))
    if state:
        sets.append(_key("prs", "state", state))
    if verdict:
        sets.append(_key("prs", "verdict", verdict))
    if len(sets) == 1:
        total = int(connection.zcard(sets[0]))
        members = _ids(connection.zrevrange(sets[0], offset, offset + limit - 1))
    else:
        # ZINTER keeps the time of prs (the other sets weigh 0): sorted by activity.
        found = connection.zinter({s: (1 if i == 0 else 0) for i, s in enumerate(sets)},
                                  withscores=True)
        pairs = sorted(((m.decode(), float(score)) for m, score in found),
                       key=lambda p: -p[1])
        total = len(pairs)
        members = [m for m, _ in pairs[offset: offset + limit]]
    pipe = connection.pipeline()
    for member in members:
        pipe.hgetall(_key("pr", member))
    rows = []
    for raw in pipe.execute():
        if raw:
            row = {k.decode(): v.decode() for k, v in raw.items()}
            row["number"] = int(row["number"])
            row["updated"] = float(row["updated"])
            rows.append(row)
    return rows, total


def note_pr(connection: redis.Redis, repository: str, number: int, title: str | None) -> None:
    """The PR's title as GitHub last gave it (runs themselves do not carry it)."""
    if not title:
        return
    key = pr_key(repository, number)
    connection.set(_key("title", key), title[:300], ex=load_store_limits().ttl_s)
    if connection.exists(_key("pr", key)):
        connection.hset(_key("pr", key), "title", title[:300])


def get_pr(connection: redis.Redis, repository: str, number: int) -> dict[str, str] | None:
    raw = connection.hgetall(_key("pr", pr_key(repository, number)))
    return {k.decode(): v.decode() for k, v in raw.items()} if raw else None


# ---- from the report job ---------------------------------------------------------------

def set_job_state(connection: redis.Redis, job_id: str, state: str,
                  outcome: dict[str, Any] | None = None, reason: str | None = None) -> None:
    """The one writer of a verify job's lifecycle state (besides start_verify creating
    it): `state` of mlxv:job:{job_id}, the record that report jobs and the dashboard
    read to tell an active job (queued, running) from an ended one, then the run's
    state here, its projection for the dashboard. Callers write GitHub first, so a
    state never claims more than GitHub shows. "cancelling" is not projected."""
    connection.hset(f"mlxv:job:{job_id}", "state", state)
    if state in JOB_STATES:
        record_job(connection, job_id, state, outcome=outcome, reason=reason)


def record_job(connection: redis.Redis, job_id: str, state: str,
               outcome: dict[str, Any] | None = None, reason: str | None = None,
               title: str | None = None, requested_by: str | None = None) -> Run | None:
    """Record a verify job's run from the report job's mlxv:job:{job_id} hash.

    state: the report job's word (queued, running, completed, failed, superseded) or
    the store's own. Never raises: the store must not break GitHub reporting.
    """
    try:
        info = {k.decode(): v.decode()
                for k, v in connection.hgetall(f"mlxv:job:{job_id}").items()}
        run = get_run(connection, job_id)
        if run is None:
            if not info:
                return None
            request = json.loads(info.get("request") or "{}")
            run = Run(id=job_id, kind="pr", repository=info["repo"], pr=int(info["number"]),
                      head_sha=info["sha"], request=request)
        now = time.time()
        if title:
            run.title = title
        elif run.title is None and run.repository and run.pr is not None:
            noted = connection.get(_key("title", pr_key(run.repository, run.pr)))
            run.title = noted.decode() if noted else None
        if state == "queued" and run.state in ("done", "failed", "stale", "cancelled"):
            # A re-run of a finished run: keep that attempt, under its own id, before
            # this one starts afresh under the job id.
            record_run(connection, run.model_copy(update={"id": f"{job_id}.{run.attempt}"},
                                                  deep=True))
            run.attempt += 1
        if requested_by:
            run.request["requested_by"] = requested_by
        run.state = JOB_STATES.get(state, state)  # type: ignore[assignment]
        if run.state == "queued":
            # a new attempt (re-run or requeue) starts its clock again
            run.queued_at, run.started_at, run.finished_at = now, None, None
            run.results, run.errors, run.outcome, run.reason = None, {}, None, None
            run.cross_checks = []
        elif run.state == "running":
            run.started_at = now
        else:
            run.finished_at = now
        if reason:
            run.reason = reason[:500]
        if outcome is not None:
            run.outcome = str(outcome.get("status") or "")
            if outcome.get("results"):
                run.results = Results.model_validate(outcome["results"])
            run.errors = {str(k): str(v)[:500] for k, v in (outcome.get("errors") or {}).items()}
            run.cross_checks = [CrossCheck.model_validate(c)
                                for c in outcome.get("cross_checks") or []]
            logs = [outcome.get("stderr_tail") or ""]
            logs += [f"{k}: {v}" for k, v in run.errors.items()]
            run.logs = "\n".join(part for part in logs if part)
            if outcome.get("status") == "stale":
                run.state = "stale"
            elif outcome.get("status") in ("timeout", "crashed"):
                run.state = "failed"
                run.reason = outcome.get("reason") or f"{outcome['status']}"
        return record_run(connection, run)
    except Exception as e:  # noqa: BLE001 - logged; GitHub reporting goes on
        log.warning("run store: could not record %s: %s", job_id, e)
        return None


# ---- sweeps ---------------------------------------------------------------------------

def sweep_id(fingerprint: dict[str, Any]) -> str:
    """The same mlx-lm tree, transformers and options give the same sweep."""
    text = json.dumps(fingerprint, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_sweep_result(connection: redis.Redis, fingerprint: dict[str, Any],
                        row: dict[str, Any], results: Results | None, logs: str = "") -> Run:
    """One model_type of a sweep: row is its sweep.json row (model_type, verdict,
    seconds, exit, error); logs, its check's output."""
    sid = sweep_id(fingerprint)
    model_type = str(row["model_type"])
    finished = time.time()
    if results is not None:
        try:
            finished = datetime.fromisoformat(results.created_at).timestamp()
        except ValueError:
            pass
    seconds = float(row.get("seconds") or 0.0)
    options = list(fingerprint.get("options") or [])
    checks = options[options.index("--checks") + 1].split(",") if "--checks" in options else []
    run = Run(
        id=f"sweep-{sid}-{model_type}", kind="sweep", state="done" if results else "failed",
        request={"model_types": [model_type], "checks": checks, "dtype": "float32",
                 "source": "sweep", "options": options},
        queued_at=finished - seconds, started_at=finished - seconds, finished_at=finished,
        results=results, errors={} if results else {model_type: str(row.get("error", ""))},
        reason=None if results else str(row.get("error", ""))[:500],
        logs=logs or ("" if results else str(row.get("error", ""))),
        mlx_lm_tree=str(fingerprint.get("mlx_lm", "")),
        transformers_version=str(fingerprint.get("transformers", "")), sweep_id=sid)
    record_run(connection, run)
    key = _key("sweep", sid)
    runs = json.loads(connection.hget(key, "runs") or "{}")
    runs[model_type] = run.id
    created = connection.hget(key, "created")
    connection.hset(key, mapping={
        "mlx_lm": run.mlx_lm_tree or "", "transformers": run.transformers_version or "",
        "mlx": str(fingerprint.get("mlx", "")), "torch": str(fingerprint.get("torch", "")),
        "options": json.dumps(options), "runs": json.dumps(runs),
        "created": float(created) if created else run.queued_at or finished,
        "updated": finished})
    connection.zadd(_key("sweeps"), {sid: float(created) if created else finished})
    _trim_sweeps(connection)
    return run


def _trim_sweeps(connection: redis.Redis) -> None:
    for raw in connection.zrange(_key("sweeps"), 0, -(MAX_SWEEPS + 1)):
        sid = raw.decode()
        runs = json.loads(connection.hget(_key("sweep", sid), "runs") or "{}")
        delete_runs(connection, list(runs.values()))
        connection.delete(_key("sweep", sid))
        connection.zrem(_key("sweeps"), sid)


def import_sweep_dir(connection: redis.Redis, out_dir: Path) -> str:
    """Store a `mlx-verify sweep` results directory (sweep.json + {model_type}.json);
    returns the sweep id. Importing the same directory twice overwrites, never doubles."""
    state = json.loads((out_dir / "sweep.json").read_text())
    fingerprint = state["fingerprint"]
    for model_type, row in sorted(state.get("rows", {}).items()):
        file = out_dir / f"{model_type}.json"
        results = Results.model_validate_json(file.read_text()) if file.exists() else None
        log = out_dir / "logs" / f"{model_type}.log"
        logs = log.read_text(errors="replace")[-LOGS_MAX_CHARS:] if log.exists() else ""
        record_sweep_result(connection, fingerprint, {"model_type": model_type, **row}, results,
                            logs)
    return sweep_id(fingerprint)


def list_sweeps(connection: redis.Redis, limit: int = 100) -> list[dict[str, Any]]:
    """Newest first."""
    ids = _ids(connection.zrevrange(_key("sweeps"), 0, limit - 1))
    pipe = connection.pipeline()
    for sid in ids:
        pipe.hgetall(_key("sweep", sid))
    out = []
    for sid, raw in zip(ids, pipe.execute(), strict=True):
        if raw:
            data = {k.decode(): v.decode() for k, v in raw.items()}
            out.append({"id": sid, "mlx_lm": data["mlx_lm"],
                        "transformers": data["transformers"],
                        "mlx": data.get("mlx", ""), "torch": data.get("torch", ""),
                        "options": json.loads(data.get("options") or "[]"),
                        "runs": json.loads(data.get("runs") or "{}"),
                        "created": float(data.get("created") or 0)})
    return out


def sweep_matrix(connection: redis.Redis, sweep: dict[str, Any]
                 ) -> dict[str, dict[str, Any]]:
    """model_type -> {"run": id, "verdict": v, "checks": {check: verdict}}."""
    names = sorted(sweep["runs"])
    metas = {m["id"]: m for m in get_metas(connection, [sweep["runs"][n] for n in names])}
    out = {}
    for name in names:
        meta = metas.get(sweep["runs"][name])
        if meta is None:
            continue
        checks: dict[str, str] = {}
        for per_type in meta["matrix"].values():
            for check, verdict in per_type.items():
                checks[check] = combine_verdicts([checks[check], verdict]) \
                    if check in checks else verdict
        out[name] = {"run": meta["id"], "verdict": meta["verdict"], "checks": checks}
    return out
