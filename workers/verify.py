"""The verify job: runs on a runner, which holds no GitHub credentials.

One job checks one PR head SHA:
1. fetch the base repository's `pull/N/head` into a fresh per-job work dir;
2. plan the model_types from the changed files on that tree (workers/planning.py, no import);
3. run `mlx-verify check` on it in the sandbox (workers/sandbox.py: no network, its own
   PID namespace, read-only system and tree, a scrubbed environment with no tokens, no
   Redis URL and no App settings, its own HOME and caches on a size-limited tmpfs),
   with wall-time, address-space, file-size and process limits, output to files the
   runner opened;
4. read back the results JSON, size-capped and validated against checks.schema;
5. with the baseline on (the spec's `baseline`, from VERIFY_BASELINE), the PR's base
   commit is checked out beside the head first, and each check run takes it as `--base`:
   one process runs both trees on the same checkpoints and inputs (checks/differential.py)
   and marks every row unchanged, fixed, new, worse or better;
6. for each model_type whose results claim its default variant's layers check passes,
   measure the final logits again outside the sandbox (workers/crosscheck.py): the
   runner builds the checkpoint and random token ids itself, computes transformers'
   logits itself, and takes only the MLX logits, as data, from a second sandboxed
   process; a claimed pass they do not confirm is reported as such (app/comment.py);
7. return the outcome: it is the rq job's result, which the server's collector
   (app/collector.py) hands to a report job; a runner cannot enqueue report jobs itself;
8. remove the work dirs.

Only infrastructure failures raise (and so are retried by rq): a failing fetch, a full
disk. Anything the PR's code does (a finding, an exception, a hang, a crash) is an
outcome, reported once and never retried.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rq import get_current_job
from rq.exceptions import AbandonedJobError
from rq.job import Job

from mlx_verify.checks.mlx_side import fast_blas_env
from mlx_verify.workers import planning, sandbox
from mlx_verify.workers.jobs import JobSpecError, VerifyOutcome, VerifySpec
from mlx_verify.workers.settings import RunnerSettings, load_runner_settings

RESULTS_MAX_BYTES = 8 * 1024 * 1024
STDERR_TAIL_BYTES = 4096
OUTPUT_FILE_MAX_BYTES = 512 * 1024 * 1024  # RLIMIT_FSIZE of the check process
GIT_TIMEOUT_S = 600
# The only variables the check process inherits; everything else (tokens, REDIS_URL,
# GITHUB_*, cloud credentials) stays behind.
ENV_KEEP = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")


class InfraError(Exception):
    """A failure of the runner or the git host, not of the PR: worth a retry."""


def scratch_dir(work: Path) -> Path:
    """The check process's only writable path (a fresh tmpfs per run on Linux)."""
    return work / "scratch"


def scrubbed_env(work: Path) -> dict[str, str]:
    scratch = scratch_dir(work)
    env = {k: os.environ[k] for k in ENV_KEEP if k in os.environ}
    env.update({
        "HOME": str(scratch / "home"),
        "TMPDIR": str(scratch / "tmp"),
        "MLX_VERIFY_CACHE": str(scratch / "cache"),  # a PR must not poison another's checkpoints
        "HF_HOME": str(scratch / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "GIT_TERMINAL_PROMPT": "0",
        # the sandbox's uid does not own the tree: let the engine's `git rev-parse` read it
        "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory", "GIT_CONFIG_VALUE_0": "*",
        **fast_blas_env(),
    })
    # other validated environments (checks/environments.py) and where the locks are
    for name in ("MLX_VERIFY_ENVIRONMENTS", "MLX_VERIFY_LOCK_DIR"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    for name in ("home", "tmp", "cache", "hf"):
        (scratch / name).mkdir(parents=True, exist_ok=True)
    return env


def git(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-c", "advice.detachedHead=false", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=GIT_TIMEOUT_S)


def fetch(settings: RunnerSettings, repo: str, number: int, sha: str, src: Path,
          env: dict[str, str]) -> bool:
    """Check out `sha` of PR `number` into src. False when the SHA is gone (force-push)."""
    url = f"{settings.git_url}/{repo}.git"
    src.mkdir()
    for args in (["init", "-q"], ["fetch", "-q", "--no-tags", "--depth=1", url,
                                  f"+refs/pull/{number}/head:refs/mlx-verify/head"]):
        done = git(args, src, env)
        if done.returncode != 0:
            raise InfraError(f"git {args[0]} failed: {done.stderr.strip()[-300:]}")
    head = git(["rev-parse", "refs/mlx-verify/head"], src, env).stdout.strip()
    if head != sha:
        # The PR moved on since the job was queued; the pinned SHA may still be fetchable.
        if git(["fetch", "-q", "--no-tags", "--depth=1", url, sha], src, env).returncode != 0:
            return False
    done = git(["checkout", "-q", "--detach", sha], src, env)
    if done.returncode != 0:
        raise InfraError(f"git checkout failed: {done.stderr.strip()[-300:]}")
    return True


def fetch_base(settings: RunnerSettings, repo: str, sha: str, src: Path,
               env: dict[str, str]) -> bool:
    """Check out the base commit `sha` into src. False when it cannot be fetched (gone
    from the base branch after a force-push): the run then has no baseline."""
    url = f"{settings.git_url}/{repo}.git"
    src.mkdir()
    done = git(["init", "-q"], src, env)
    if done.returncode != 0:
        raise InfraError(f"git init failed: {done.stderr.strip()[-300:]}")
    if git(["fetch", "-q", "--no-tags", "--depth=1", url, sha], src, env).returncode != 0:
        return False
    done = git(["checkout", "-q", "--detach", sha], src, env)
    if done.returncode != 0:
        raise InfraError(f"git checkout failed: {done.stderr.strip()[-300:]}")
    return True


def _tail(path: Path, size: int = STDERR_TAIL_BYTES) -> str:
    try:
        return sandbox.read_regular_file(path, size, tail=True).decode(errors="replace")
    except OSError as e:
        return f"(stderr unreadable: {e})"


def run_check(settings: RunnerSettings, work: Path, src: Path, model_types: list[str],
              request: dict[str, Any], env: dict[str, str], tag: str,
              config_file: Path | None = None,
              base_src: Path | None = None) -> dict[str, Any]:
    """One sandboxed `mlx-verify check`: {"code", "results" | None, "stderr", "timeout"}.
    Raises InfraError when the sandbox cannot be made (PR code is then not run)."""
    run_dir = work / f"run-{tag}"
    run_dir.mkdir()
    # The results leave the sandbox through a descriptor of a file the runner created; the
    # path of run_dir is not visible inside it.
    out_fd = os.open(run_dir / "results.json",
                     os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    sandbox_settings = sandbox.load_sandbox_settings()
    # -I: no PYTHON* variables, no user site, and the cwd is not on sys.path, so the
    # PR tree cannot shadow our own modules; mlx_lm comes from --mlx-lm only.
    command = [sys.executable, "-I", "-m", "mlx_verify.checks.cli", "check", *model_types,
               "--mlx-lm", str(src), "--json", f"/dev/fd/{out_fd}"]
    readable = [src]
    if base_src is not None:  # the PR's base commit, run in the same process (--base)
        command += ["--base", str(base_src)]
        readable.append(base_src)
    if config_file is not None:
        command += ["--config", str(config_file)]
        readable.append(config_file)
    if request.get("checks"):
        command += ["--checks", ",".join(request["checks"])]
    if request.get("dtype", "float32") != "float32":
        command += ["--dtype", request["dtype"]]
    stdout_path, stderr_path = run_dir / "stdout.txt", run_dir / "stderr.txt"
    try:
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            try:
                finished = sandbox.run(
                    command, env=env, writable=scratch_dir(work), readable=readable,
                    settings=sandbox_settings, memory_mb=settings.memory_mb,
                    file_size=OUTPUT_FILE_MAX_BYTES, timeout_s=settings.timeout_s,
                    stdout=stdout, stderr=stderr, pass_fds=(out_fd,))
            except sandbox.SandboxUnavailable as e:
                raise InfraError(str(e)) from None
        if finished.timeout:
            return {"code": None, "results": None, "stderr": _tail(stderr_path),
                    "timeout": True}
        code = finished.code
        results = None
        if code in (0, 1):
            size = os.fstat(out_fd).st_size
            if size > RESULTS_MAX_BYTES:
                return {"code": code, "results": None, "timeout": False,
                        "stderr": f"results JSON too large ({size} bytes)"}
            data = sandbox.read_regular_fd(out_fd, RESULTS_MAX_BYTES)
            if data:
                from pydantic import ValidationError

                from mlx_verify.checks.schema import Results

                try:
                    results = Results.model_validate_json(data).model_dump(mode="json")
                except ValidationError as e:
                    return {"code": code, "results": None, "timeout": False,
                            "stderr": f"results JSON does not match the schema: "
                                      f"{str(e).splitlines()[0]}"}
    finally:
        os.close(out_fd)
    return {"code": code, "results": results, "stderr": _tail(stderr_path), "timeout": False}


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "no error output"


def _merge(into: dict[str, Any] | None, results: dict[str, Any]) -> dict[str, Any]:
    if into is None:
        return results
    for key in ("reports", "base_reports", "differential"):
        into.setdefault(key, []).extend(results.get(key) or [])
    return into


def hub_config(repo_id: str, work: Path) -> Path:
    """config.json of a Hub repository (the runner's own download: no PR code runs)."""
    from huggingface_hub import hf_hub_download

    target = work / "hub" / repo_id.replace("/", "__")
    target.mkdir(parents=True, exist_ok=True)
    return Path(hf_hub_download(repo_id, "config.json", local_dir=target))


Runs = list[tuple[list[str], Path | None]]  # (model_types, config file) per check run


def verify_tree(settings: RunnerSettings, work: Path, src: Path, spec: dict[str, Any],
                env: dict[str, str],
                base_src: Path | None = None) -> tuple[dict[str, Any], Runs]:
    """Plan and run the checks on a checked-out tree: the outcome dict for the report,
    and the runs it made (the baseline repeats them on the base commit)."""
    request = spec["request"]
    outcome: dict[str, Any] = {"status": "done", "results": None, "errors": {},
                               "skipped": [], "planned": [], "model_types": [],
                               "truncated": False}
    mlx_lm_dir = src / "mlx_lm"
    if not (mlx_lm_dir / "__init__.py").is_file():
        outcome["errors"]["(tree)"] = "no mlx_lm package at the top of the repository"
        return outcome, []

    if request.get("model_types"):
        planned = list(request["model_types"])
    elif request.get("hub"):
        planned = []
    else:
        plan = planning.make_plan(mlx_lm_dir, spec.get("changed_files") or [])
        planned = plan.model_types
        outcome["plan"] = plan.to_dict()  # why each model_type is planned
    outcome["planned"] = planned
    if not request.get("model_types") and spec.get("auto_model_types") is not None:
        planned = [t for t in planned if t in spec["auto_model_types"]]
    model_types, unknown = planning.verifiable(planned)
    outcome["skipped"] = unknown
    limit = int(spec.get("max_model_types") or len(model_types) or 1)
    if request.get("source") == "auto" and len(model_types) > limit:
        model_types, outcome["truncated"] = model_types[:limit], True
    outcome["model_types"] = model_types
    if not model_types and not request.get("hub"):
        outcome["status"] = "nothing" if not unknown else "done"
        return outcome, []

    runs: Runs = []
    if model_types:
        runs.append((model_types, None))
    for repo_id in request.get("hub") or []:
        try:
            config = hub_config(repo_id, work)
            model_type = str(json.loads(config.read_text()).get("model_type", ""))
        except Exception as e:  # network, missing repo, bad JSON: the user's input
            outcome["errors"][repo_id] = f"cannot read config.json from the Hub: {e}"[:300]
            continue
        outcome["model_types"].append(model_type)
        runs.append(([model_type], config))
    done = run_all(settings, work, src, runs, request, env, base_src)
    outcome["errors"].update(done.pop("errors"))  # after the Hub ones
    claims = done.pop("claims")
    outcome.update(done)
    if outcome["status"] == "done" and outcome["results"] is not None:
        outcome["cross_checks"] = cross_check_all(settings, work, src, claims, request, env)
    return outcome, runs


def cross_check_all(settings: RunnerSettings, work: Path, src: Path,
                    claims: list[tuple[list[str], Path | None, dict[str, Any]]],
                    request: dict[str, Any], env: dict[str, str]) -> list[dict[str, Any]]:
    """Final logits measured outside the sandbox (workers/crosscheck.py), for
    transformers' default config and for each Hub config alike: every variant whose
    sandboxed results claim the layers check passes there, and every variant the runner
    builds that the results leave out (claimed "omitted"), so a report cannot hide a
    variant by not listing it. `claims` holds each check run's (model_types, Hub config
    or None, results): a claim is measured on the variants the runner builds from that
    run's own source."""
    from mlx_verify.checks import synth
    from mlx_verify.workers import crosscheck

    # a run restricted to other checks (/verify --checks rope) made no layers claims
    layers_ran = not request.get("checks") or "layers" in request["checks"]
    done = []
    for model_types, config_file, results in claims:
        for model_type in model_types:
            # every report of it the run holds (their `source` is the PR's writing too)
            reports = [r for r in results.get("reports") or []
                       if r.get("model_type") == model_type]
            if not reports:
                continue  # the run could not check it: an error of the run already
            to_measure: dict[str, tuple[str | None, dict[str, Any] | None]] = {}
            listed: set[str] = set()
            for report in reports:
                listed |= {str(v.get("name")) for v in report.get("variants") or []}
                for variant, claim in crosscheck.claimed_variants(report).items():
                    listed.add(variant)
                    if claim[0] == "pass":
                        to_measure.setdefault(variant, claim)
            built: dict[str, dict[str, Any]] = {}
            built_error = None
            try:
                source = None if config_file is None else json.loads(config_file.read_text())
                built = crosscheck.runner_variants(model_type, source)
            except Exception as e:
                built_error = synth._one_line(e)
            if layers_ran:
                to_measure.update({variant: ("omitted", None) for variant in built
                                   if variant not in listed})
            if not to_measure:
                continue  # claimed fails or errors only: no pass to confirm
            try:
                checked = crosscheck.cross_check_model(
                    model_type=model_type, claims=to_measure, built=built,
                    built_error=built_error, src=src, work=work, writable=scratch_dir(work),
                    env=env, dtype=request.get("dtype", "float32"),
                    memory_mb=settings.memory_mb, timeout_s=settings.timeout_s,
                    file_size=OUTPUT_FILE_MAX_BYTES)
            except sandbox.SandboxUnavailable as e:
                raise InfraError(str(e)) from None
            except Exception as e:  # the runner's own code failed: not measured, never a pass
                checked = [crosscheck.CrossCheck(
                    model_type=model_type, variant=variant, verdict="error",
                    claimed=claim[0], bound=0.0, reason=f"the runner's cross-check failed: "
                                                       f"{type(e).__name__}: {str(e)[:300]}")
                    for variant, claim in to_measure.items()]
            done += [c.model_dump(mode="json", exclude_none=True) for c in checked]
    return done


def run_all(settings: RunnerSettings, work: Path, src: Path, runs: Runs,
            request: dict[str, Any], env: dict[str, str],
            base_src: Path | None = None) -> dict[str, Any]:
    """Every planned `mlx-verify check` run on one tree: {"results", "errors"}, plus
    {"status", ...} when a run timed out or crashed (the remaining runs are not made)."""
    # "claims": each check run's (model_types, Hub config, results), for cross_check_all
    done: dict[str, Any] = {"results": None, "errors": {}, "claims": []}
    for index, (types, config) in enumerate(runs):
        run = run_check(settings, work, src, types, request, env, str(index), config,
                        base_src)
        if run["timeout"]:
            done.update(status="timeout", timeout_s=settings.timeout_s,
                        stderr_tail=run["stderr"])
            return done
        if run["code"] in (0, 1) and run["results"] is not None:
            done["results"] = _merge(done["results"], run["results"])
            done["claims"].append((types, config, run["results"]))
        elif run["code"] == 2 and len(types) > 1:
            # One model_type could not run; find out which, keep the others' results.
            for single in types:
                alone = run_check(settings, work, src, [single], request, env,
                                  f"{index}-{single}", base_src=base_src)
                if alone["timeout"]:
                    done.update(status="timeout", timeout_s=settings.timeout_s,
                                stderr_tail=alone["stderr"])
                    return done
                if alone["results"] is not None:
                    done["results"] = _merge(done["results"], alone["results"])
                    done["claims"].append(([single], None, alone["results"]))
                else:
                    done["errors"][single] = _last_line(alone["stderr"])
        elif run["code"] == 2 or (run["code"] in (0, 1) and run["results"] is None):
            key = config and types[0] or ",".join(types)
            done["errors"][key] = _last_line(run["stderr"])
        else:  # killed by a signal (memory limit, segfault) or an unknown exit code
            done.update(status="crashed", stderr_tail=run["stderr"],
                        reason=f"exit status {run['code']}")
            return done
    return done


def checkout_base(settings: RunnerSettings, spec: dict[str, Any], work: Path,
                  env: dict[str, str]) -> tuple[Path | None, dict[str, Any]]:
    """The PR's base commit, checked out beside the head: the check runs both trees in
    one sandboxed process (`mlx-verify check --base`), on the same checkpoints, and marks
    every row unchanged, fixed, new, worse or better. (None, base_* fields) when it
    cannot be fetched (gone after a force-push) or holds no mlx_lm: no baseline then."""
    src = work / "base"
    status = "in-run"
    if not fetch_base(settings, spec["repo"], spec["base_sha"], src, env):
        status = "unavailable"
    elif not (src / "mlx_lm" / "__init__.py").is_file():
        status = "unavailable"
    fields = {"base_sha": spec["base_sha"], "base_status": status}
    return (src if status == "in-run" else None), fields


def run_verify(spec: dict[str, Any]) -> dict[str, Any]:
    """The rq entry point. spec: a workers.jobs.VerifySpec as JSON; returns a short
    summary of the outcome. A spec this runner cannot read fails the job at once, with
    one line, and is not retried (it would fail the same way)."""
    job = get_current_job()
    try:
        spec = VerifySpec.read(spec, "verify job spec").model_dump(mode="json")
    except JobSpecError:
        if job is not None:
            job.retries_left = None
        raise
    settings = load_runner_settings()
    try:  # fail closed before anything runs: no sandbox, no PR code
        sandbox.probe(sandbox.load_sandbox_settings())
    except sandbox.SandboxUnavailable as e:
        raise InfraError(str(e)) from None
    started = time.monotonic()
    Path(settings.work_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="job-", dir=settings.work_dir))
    try:
        env = scrubbed_env(work)
        src = work / "src"
        if not fetch(settings, spec["repo"], int(spec["number"]), spec["sha"], src, env):
            outcome: dict[str, Any] = {"status": "stale"}
        else:
            base_src, base = None, {}
            if spec.get("baseline") and spec.get("base_sha"):
                base_src, base = checkout_base(settings, spec, work, env)
            outcome, _ = verify_tree(settings, work, src, spec, env, base_src)
            outcome.update(base)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    outcome["duration_s"] = round(time.monotonic() - started, 1)
    # The job's result: the server's collector hands it to the report job, which reads
    # it back through VerifyOutcome again (the runner is not trusted to have done so).
    return VerifyOutcome.model_validate(outcome).to_json()


def on_verify_failure(job: Job, connection, exc_type, exc_value, traceback) -> None:
    """rq failure callback, also run for a runner that died (AbandonedJobError) by
    whichever process cleans the registry: notes the reason in the job's meta, where the
    server's collector reads it (app/collector.py). Writes nothing else."""
    if exc_type is AbandonedJobError or isinstance(exc_value, AbandonedJobError):
        reason = "the runner stopped while running the checks"
    else:
        first = str(exc_value).splitlines()[0] if str(exc_value) else ""
        reason = f"{getattr(exc_type, '__name__', 'error')}: {first}"[:300]
    job.meta["failure"] = reason
    job.save_meta()
