"""`mlx-verify`: command line of the verification engine.

Exit codes (a contract for tooling): 0 every check passed; 1 at least one check
failed or errored on a model that ran (a finding); 2 could not run (bad input,
unknown model_type, bad path, broken config, import error in the checked code),
with one line on stderr and no traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time
from typing import Any

EXIT_PASS, EXIT_FINDING, EXIT_CANNOT_RUN = 0, 1, 2
DTYPES = ("float32", "bfloat16", "float16")


def _quiet_libraries() -> None:
    # Progress bars would bury the report. Warnings are not silenced: those raised during
    # a check go into its results (engine.run_check), the others to stderr.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Progress:
    """Step messages on stderr, only when it is a terminal. Transient: each message
    replaces the last, and done() clears it, so the report that follows fits a screen."""

    def __init__(self, transient: bool = False) -> None:
        self.enabled = sys.stderr.isatty()
        self.transient = transient
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.perf_counter() - self.start:5.1f}s] {message}"
        if self.transient:
            sys.stderr.write("\r\x1b[K" + line)
            sys.stderr.flush()
        else:
            print(line, file=sys.stderr)

    def done(self) -> None:
        if self.enabled and self.transient:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def fail(message: str) -> int:
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K")  # a transient progress line
    print(f"mlx-verify: error: {message}", file=sys.stderr)
    return EXIT_CANNOT_RUN


def cmd_serve(args: argparse.Namespace) -> int:
    from mlx_verify.app.server import serve

    return serve(args)


def cmd_worker(args: argparse.Namespace) -> int:
    # the report worker holds the App key (app/), runners must not import it (workers/)
    queues = args.queue if isinstance(args.queue, list) else [args.queue]
    if "report" in queues:
        from mlx_verify.app.worker import worker
    else:
        from mlx_verify.workers.worker import worker
    return worker(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-verify",
        description="Check that mlx-lm models compute what transformers computes.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="verify one or more model_types")
    check.add_argument("model_types", nargs="+", metavar="MODEL_TYPE")
    check.add_argument("--mlx-lm", dest="mlx_lm", metavar="PATH",
                       help="directory holding the mlx_lm package to check (default: installed)")
    check.add_argument("--base", metavar="TREE|REF",
                       help="also run the base tree (a directory holding mlx_lm, or a git ref "
                            "of the checked checkout, e.g. main) and mark each row unchanged, "
                            "fixed, new, worse or better; exit 1 only on new or worse rows")
    check.add_argument("--fail-on", dest="fail_on", choices=("config", "any"), default=None,
                       help="which findings exit 1: 'config' (the config under test only; "
                            "latent variants and keys are reported, exit 0), 'any'. Default: "
                            "'config' with --config/--hub-model/--checkpoint, else 'any'")
    check.add_argument("--config", metavar="FILE",
                       help="a real config.json (or its directory) to shrink instead of "
                            "transformers' default config")
    check.add_argument("--hub-model", dest="hub_models", action="append", default=[],
                       metavar="REPO_ID[@REVISION]",
                       help="a Hugging Face Hub repository whose config.json to check "
                            "(repeatable: variants are diffed; honours the local cache and "
                            "HF_HUB_OFFLINE)")
    check.add_argument("--checkpoint", dest="checkpoints", action="append", default=[],
                       metavar="DIR", help="a local checkpoint directory (repeatable)")
    check.add_argument("--full-weights", action="store_true",
                       help="also run on the real weights of --hub-model/--checkpoint "
                            "(needs the memory for them)")
    check.add_argument("--checks", metavar="LIST",
                       help="comma-separated checks to run (default: all)")
    check.add_argument("--variants", metavar="LIST",
                       help="comma-separated variants to run (default: all; see the report "
                            "for the names, e.g. default,rope-theta,sliding-window)")
    check.add_argument("--dtype", choices=DTYPES, default="float32")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--json", metavar="FILE", help="write the results JSON (- for stdout)")
    check.add_argument("--markdown", metavar="FILE",
                       help="write the Markdown report, the PR comment's format (- for stdout)")
    check.add_argument("--html", metavar="FILE",
                       help="write a standalone HTML report (one file, works offline)")
    check.add_argument("-v", "--verbose", action="store_true",
                       help="terminal report: every check, and facts and per-stage tables "
                            "of each finding")

    sweep = sub.add_parser("sweep", help="check every model_type both libraries have")
    sweep.add_argument("--mlx-lm", dest="mlx_lm", metavar="PATH")
    sweep.add_argument("--out", default="sweep", metavar="DIR",
                       help="results directory (resumable; default ./sweep)")
    sweep.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2)),
                       help="model_types checked at once (default: the number of cores)")
    sweep.add_argument("--types", metavar="LIST", help="only these model_types")
    sweep.add_argument("--checks", metavar="LIST")
    sweep.add_argument("--variants", metavar="LIST")
    sweep.add_argument("--redis", metavar="URL",
                       help="also store the runs in this Redis (the dashboard's run store)")
    sweep.add_argument("--previous", metavar="DIR",
                       help="an earlier sweep's directory: list what changed since")

    # The server and worker flags live here, not in app/ or workers/: importing those
    # to build the parser would slow every `mlx-verify check` by 1.5 s.
    serve = sub.add_parser("serve", help="run the GitHub App's webhook server")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    serve.add_argument("--port", type=int, default=8000)
    worker = sub.add_parser("worker", help="run a queue worker (verify runner or reporter)")
    worker.add_argument("--queue", action="append", required=True, metavar="NAME",
                        help="queue to work on: report, verify, verify-large, ... (repeatable)")
    worker.add_argument("--burst", action="store_true", help="exit once the queues are empty")

    report = sub.add_parser("report", help="render saved results (a --json file)")
    report.add_argument("results", metavar="RESULTS.json")
    report.add_argument("--html", metavar="FILE", help="write the standalone HTML report")
    report.add_argument("--markdown", metavar="FILE", help="write the Markdown report (- for "
                                                           "stdout)")
    report.add_argument("-v", "--verbose", action="store_true")

    listing = sub.add_parser("list", help="model_types present in both libraries")
    listing.add_argument("model_types", nargs="*", metavar="MODEL_TYPE",
                         help="only these (default: all)")
    listing.add_argument("--mlx-lm", dest="mlx_lm", metavar="PATH")
    listing.add_argument("--no-probe", action="store_true",
                         help="do not try to build and load each model")
    return parser


def _write(target: str, text: str) -> None:
    if target == "-":
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        with open(target, "w") as f:
            f.write(text)


def output_problem(args: argparse.Namespace) -> str | None:
    """Why a --json, --markdown or --html file cannot be written, asked before the checks
    run: minutes of measurement are not lost to a missing directory at the end."""
    for option in ("json", "markdown", "html"):
        target = getattr(args, option, None)
        if not target or target == "-":
            continue
        if os.path.isdir(target):
            return f"--{option} {target}: cannot write: a directory"
        if os.path.exists(target):
            # a file to replace, or a descriptor the runner opened (/dev/fd/N: its
            # directory is not writable on macOS, the descriptor is)
            continue
        directory = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(directory):
            return f"--{option} {target}: cannot write: no directory {directory}"
        if not os.access(directory, os.W_OK):
            return f"--{option} {target}: cannot write: directory {directory} not writable"
    return None


def checkout_here() -> str | None:
    """"." when the working directory is an mlx-lm checkout (it holds mlx_lm/__init__.py):
    a contributor checks the code in front of them."""
    return "." if os.path.isfile(os.path.join("mlx_lm", "__init__.py")) else None


def write_reports(results: Any, args: argparse.Namespace) -> None:
    """--json, --markdown, --html as asked; and the terminal report on stdout (colour on a
    TTY, plain text piped) unless another report goes there or --json is asked for."""
    if getattr(args, "json", None):
        _write(args.json, results.model_dump_json(indent=2))
    if args.markdown:
        from . import report

        _write(args.markdown, report.render(results))
    if args.html:
        from . import html

        _write(args.html, html.render(results))
    to_stdout = "-" in (getattr(args, "json", None), args.markdown, args.html)
    if not (to_stdout or getattr(args, "json", None)):
        from . import terminal

        terminal.render(results, sys.stdout, sys.stdout.isatty(), args.verbose)


def cmd_report(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .schema import Results

    if (problem := output_problem(args)) is not None:
        return fail(problem)
    try:
        with open(args.results) as f:
            results = Results.model_validate_json(f.read())
    except OSError as e:
        return fail(f"{args.results}: cannot read: {e.strerror or e}")
    except UnicodeDecodeError:
        return fail(f"{args.results}: not a text file")
    except ValidationError as e:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return fail(f"{args.results}: not mlx-verify results ({e.error_count()} problem(s); "
                    f"first: {where or 'top level'}: {first.get('msg', 'invalid')})")
    write_reports(results, args)
    return exit_code(results, "any")


def exit_code(results: Any, fail_on: str) -> int:
    """The exit-code policy. With a base (--base): 1 only on new or worse rows. Else 1 on
    any finding (fail_on "any"), or only on findings about the config under test, a model
    that could not run included (fail_on "config": latent variants and perturbed keys a
    real config does not use are reported and exit 0)."""
    if results.differential:
        from .differential import blocking

        return EXIT_FINDING if blocking(results.differential) else EXIT_PASS
    bad = ("fail", "error")
    if fail_on == "config":
        findings = [r for r in results.reports if r.error] + [
            c for r in results.reports for c in r.checks
            if c.verdict in bad and c.reach in ("config", None)]
        return EXIT_FINDING if findings else EXIT_PASS
    return EXIT_PASS if results.verdict in ("pass", "skip") else EXIT_FINDING


def cmd_check(args: argparse.Namespace) -> int:
    from . import engine, sources
    from .mlx_side import MlxLmError, use_mlx_lm
    from .schema import Results

    selected = engine.ALL_CHECKS
    if args.checks:
        selected = tuple(c.strip() for c in args.checks.split(",") if c.strip())
        unknown = [c for c in selected if c not in engine.ALL_CHECKS]
        if unknown or not selected:
            return fail(f"unknown check(s) {', '.join(unknown) or '(none given)'}; "
                        f"available: {', '.join(engine.ALL_CHECKS)}")
    if (problem := output_problem(args)) is not None:
        return fail(problem)
    given = args.config is not None or args.hub_models or args.checkpoints
    if given and len(args.model_types) > 1:
        return fail("--config, --hub-model and --checkpoint go with a single MODEL_TYPE")
    if args.full_weights and not (args.hub_models or args.checkpoints):
        return fail("--full-weights needs --hub-model or --checkpoint")
    moved = run_in_environment_that_knows(args.model_types, args.argv)
    if moved is not None:
        return moved
    announce_checkout(args)
    progress = Progress(transient=True)
    try:
        found = [sources.from_checkpoint(p) for p in args.checkpoints]
        found += [sources.from_hub(spec, args.full_weights) for spec in args.hub_models]
        if args.config is not None:
            found.insert(0, sources.from_config_file(args.config))
        options: dict[str, Any] = dict(
            checks=selected, dtype=args.dtype, seed=args.seed, given=found or None,
            full_weights=args.full_weights, strict_variants=len(args.model_types) == 1,
            variant_names=tuple(v.strip() for v in args.variants.split(",") if v.strip())
            if args.variants else None)
        if args.base is not None:
            return check_against_base(args, options, progress)
        info = use_mlx_lm(args.mlx_lm)
        env = engine.environment(info)
        results = Results(command=engine.command_line(), environment=env)
        for model_type in args.model_types:
            results.reports.append(engine.verify(model_type, progress=progress, **options))
        engine.mark_systemic(results.reports)
    except (engine.InputError, MlxLmError, sources.SourceError) as e:
        progress.done()
        return fail(str(e))
    progress.done()
    write_reports(results, args)
    return exit_code(results, args.fail_on or ("config" if given else "any"))


def check_against_base(args: argparse.Namespace, options: dict[str, Any],
                       progress: Progress) -> int:
    """--base: the PR tree and the base tree in this process (checks/differential.py).
    Exit 1 on new or worse rows only: what base already had is no finding of the PR's."""
    import tempfile

    from . import differential, engine
    from .schema import Results

    base = args.base
    with tempfile.TemporaryDirectory(prefix="mlx-verify-base-") as unpacked:
        if not os.path.isfile(os.path.join(base, "mlx_lm", "__init__.py")):
            # a git ref of the checkout being checked
            repo = args.mlx_lm or "."
            try:
                base = differential.base_tree_from_ref(repo, args.base, unpacked)
            except (ValueError, OSError) as e:
                progress.done()
                return fail(str(e) if isinstance(e, ValueError) else
                            f"--base {args.base}: not a directory holding mlx_lm, and git "
                            f"cannot read it as a ref ({e})")
            print(f"mlx-verify: base tree: mlx_lm at {args.base} of {os.path.abspath(repo)}",
                  file=sys.stderr)
        pr_info, base_info, pr_reports, base_reports, rows = differential.verify_trees(
            args.model_types, args.mlx_lm, base, progress, **options)
        results = Results(command=engine.command_line(),
                          environment=engine.environment(pr_info),
                          base_environment=engine.environment(base_info),
                          reports=pr_reports, base_reports=base_reports, differential=rows)
        results.base_environment.mlx_lm_path = (
            f"{args.base} ({results.base_environment.mlx_lm_path})" if base != args.base
            else results.base_environment.mlx_lm_path)
    progress.done()
    write_reports(results, args)
    return EXIT_FINDING if differential.blocking(rows) else EXIT_PASS


def run_in_environment_that_knows(model_types: list[str], argv: list[str]) -> int | None:
    """None when this environment's transformers knows every model_type; else exit 2
    naming the release that has it, or the same command run in another validated
    environment that knows them (checks/environments.py)."""
    import transformers

    from . import compat, environments

    unknown = [t for t in model_types if t not in compat.hf_known_model_types()]
    if not unknown:
        return None
    if os.environ.get(environments.CHOSEN_FLAG):
        return fail(f"transformers {transformers.__version__} in the chosen environment has "
                    f"no model_type {', '.join(unknown)}")
    chosen, line = environments.choose(unknown, transformers.__version__)
    if chosen is None:
        return fail(line)
    print(f"mlx-verify: {line}", file=sys.stderr, flush=True)
    env = {**os.environ, environments.CHOSEN_FLAG: chosen.python}
    os.execve(chosen.python, [chosen.python, "-m", "mlx_verify.checks.cli", *argv], env)
    return None  # not reached


def announce_checkout(args: argparse.Namespace) -> None:
    """Without --mlx-lm, inside an mlx-lm checkout: check ./mlx_lm, and say so."""
    if args.mlx_lm is None and checkout_here() is not None:
        args.mlx_lm = checkout_here()
        print(f"mlx-verify: checking ./mlx_lm (this directory, {os.getcwd()}, is an mlx-lm "
              "checkout; --mlx-lm PATH checks another)", file=sys.stderr)


def cmd_list(args: argparse.Namespace) -> int:
    from . import engine
    from .mlx_side import MlxLmError, use_mlx_lm

    announce_checkout(args)
    try:
        use_mlx_lm(args.mlx_lm)
    except MlxLmError as e:
        return fail(str(e))
    progress = Progress()
    rows: list[tuple[str, str, str]] = []
    shared = engine.shared_model_types()
    unknown = sorted(set(args.model_types) - {t for t, _ in shared})
    if unknown:
        return fail(f"not in both libraries: {', '.join(unknown)}")
    for model_type, module in shared:
        if args.model_types and model_type not in args.model_types:
            continue
        status = "not probed"
        if not args.no_probe:
            progress(f"probing {model_type}")
            status = engine.probe(model_type)
        rows.append((model_type, module, status))
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"{'model_type'.ljust(width)}  {'mlx_lm module'.ljust(22)}  runs")
    for model_type, module, status in rows:
        print(f"{model_type.ljust(width)}  {module.ljust(22)}  {status}")
    return EXIT_PASS


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import engine
    from . import sweep as sweeping
    from .mlx_side import MlxLmError, use_mlx_lm

    announce_checkout(args)  # before the options the sweep's processes get
    try:
        info = use_mlx_lm(args.mlx_lm)
    except MlxLmError as e:
        return fail(str(e))
    import transformers

    available = [t for t, _ in engine.shared_model_types()]
    types = available
    if args.types:
        types = [t.strip() for t in args.types.split(",") if t.strip()]
        unknown = [t for t in types if t not in available]
        if unknown:
            return fail(f"not in both libraries: {', '.join(unknown)}")
    if args.previous and not Path(args.previous).is_dir():
        return fail(f"{args.previous}: not a directory")
    connection = None
    if args.redis:  # checked before the sweep, not after an hour of it
        import redis

        try:
            connection = redis.Redis.from_url(args.redis)
            connection.ping()
        except (redis.RedisError, ValueError) as e:
            return fail(f"--redis: cannot connect ({str(e).splitlines()[0]})")
    options = []
    for flag, value in (("--mlx-lm", args.mlx_lm), ("--checks", args.checks),
                        ("--variants", args.variants)):
        if value:
            options += [flag, value]
    # A new mlx or torch release can change results as much as a new mlx-lm: a sweep
    # resumes only on the same four.
    fingerprint = {"mlx_lm": f"{info.version} {info.git_sha or ''} {info.path}".strip(),
                   "transformers": transformers.__version__,
                   "mlx": importlib.metadata.version("mlx"),
                   "torch": importlib.metadata.version("torch"), "options": options}
    rows, summary = sweeping.sweep(main, types, Path(args.out), options, args.jobs, fingerprint,
                                   Path(args.previous) if args.previous else None, Progress())
    if connection is not None:
        from mlx_verify.app import store

        store.import_sweep_dir(connection, Path(args.out))
    print(summary.read_text(), end="")
    verdicts = [r["verdict"] for r in rows]
    return EXIT_PASS if all(v in ("pass", "skip") for v in verdicts) else EXIT_FINDING


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    handlers: dict[str, Any] = {"check": cmd_check, "list": cmd_list, "sweep": cmd_sweep,
                                "report": cmd_report,
                                "serve": cmd_serve, "worker": cmd_worker}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return fail("interrupted")
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): nothing left to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PASS
    except Exception as e:  # our own bug: still one line, but say how to see more
        if os.environ.get("MLX_VERIFY_DEBUG"):
            raise
        first_line = str(e).splitlines()[0] if str(e) else ""
        return fail(f"internal error: {type(e).__name__}: {first_line}"
                    " (set MLX_VERIFY_DEBUG=1 for the traceback)")


if __name__ == "__main__":
    sys.exit(main())
