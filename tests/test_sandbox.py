"""The runner's sandbox (workers/sandbox.py) itself: the real check gives the same verdict
and numbers inside it, its command lines (bubblewrap, macOS sandbox-exec) hold what
docs/deploy.md says, the unprivileged mode works, and a runner without a sandbox
refuses to run PR code. The attacks are in tests/test_sandbox_attacks.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_verify.app.settings import SettingsError
from mlx_verify.workers import sandbox, verify
from tests.conftest import installed_mlx_lm

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = sandbox.SandboxSettings(enabled=True, max_processes=256, disk_mb=512, uid=65534)


def job_dir(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    work = tmp_path / "job"
    work.mkdir()
    return work, verify.scrubbed_env(work)


def test_the_check_gives_the_same_results_inside_the_sandbox(tmp_path):
    work, env = job_dir(tmp_path)
    src = work / "src"
    src.mkdir()
    shutil.copytree(installed_mlx_lm(), src / "mlx_lm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    outcomes = {}
    for name, settings in (("sandboxed", SETTINGS),
                           ("unsandboxed", sandbox.SandboxSettings(False, 256, 512, 65534))):
        out = tmp_path / f"{name}.json"
        fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        command = [sys.executable, "-I", "-m", "mlx_verify.checks.cli", "check", "llama",
                   "--checks", "layers", "--variants", "default", "--mlx-lm", str(src),
                   "--json", f"/dev/fd/{fd}"]
        with open(tmp_path / f"{name}.out", "wb") as stdout, \
                open(tmp_path / f"{name}.err", "wb") as stderr:
            finished = sandbox.run(command, env=env, writable=verify.scratch_dir(work),
                                   readable=[src], settings=settings, memory_mb=16384,
                                   file_size=1 << 30, timeout_s=600, stdout=stdout,
                                   stderr=stderr, pass_fds=(fd,))
        os.close(fd)
        assert finished.code == 0, (tmp_path / f"{name}.err").read_text()[-3000:]
        outcomes[name] = json.loads(out.read_text())
    inside, outside = outcomes["sandboxed"], outcomes["unsandboxed"]
    (report_in,), (report_out,) = inside["reports"], outside["reports"]
    assert report_in["verdict"] == report_out["verdict"] == "pass"  # and both exited 0
    assert inside["environment"]["blas"] == outside["environment"]["blas"]
    # the validated lock is read inside too (constraints/ is mounted read-only)
    assert inside["environment"]["lock"] == outside["environment"]["lock"]
    assert inside["environment"]["lock"].startswith("constraints/")
    (layers_in,), (layers_out,) = report_in["checks"], report_out["checks"]
    assert layers_in["check"] == "layers" and layers_in["verdict"] == "pass"
    assert layers_in["layers"] == layers_out["layers"]  # the same numbers, row by row


def options(command: list[str]) -> list[str]:
    return command[:command.index("--")]


def test_bwrap_command_mounts_only_what_the_check_reads(tmp_path):
    work, env = job_dir(tmp_path)
    src = work / "src"
    src.mkdir()
    command = sandbox.bwrap_command(["CHECK"], env=env, writable=verify.scratch_dir(work),
                                    readable=[src], settings=SETTINGS, as_root=False)
    args = options(command)
    for flag in ("--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-user",
                 "--disable-userns", "--die-with-parent", "--new-session", "--clearenv"):
        assert flag in args
    assert args[args.index("--cap-drop") + 1] == "ALL" and "--cap-add" not in args
    # writable: only the scratch tmpfs (size-limited) and /dev/shm; no read-write bind
    assert "--bind" not in args and "--dev-bind" not in args
    tmpfs = [args[i + 1] for i, a in enumerate(args) if a == "--tmpfs"]
    assert tmpfs == ["/dev/shm", str(verify.scratch_dir(work))]
    assert args.count("--size") == 2 and str(512 * 1024 * 1024) in args
    bound = [args[i + 2] for i, a in enumerate(args) if a == "--ro-bind"]
    assert str(src) in bound and "/usr" in bound and sys.prefix in bound
    for secret_holder in ("/etc", "/tmp", "/run", "/var", "/home", "/root", str(work)):
        assert secret_holder not in bound  # (unix sockets, runner.env, the run dir)
    assert all(not b.startswith("/etc/mlx-verify") for b in bound)
    # the environment is exactly the scrubbed one
    set_env = {args[i + 1]: args[i + 2] for i, a in enumerate(args) if a == "--setenv"}
    assert set_env == env
    launcher = command[command.index("--") + 1:]
    assert launcher[1:3] == ["-I", "-S"] and launcher[-1] == "CHECK"
    assert launcher[-3:-1] == ["256", "-1"]  # RLIMIT_NPROC 256, no uid change


def test_a_root_runner_drops_to_an_unprivileged_uid(tmp_path):
    work, env = job_dir(tmp_path)
    command = sandbox.bwrap_command(["CHECK"], env=env, writable=verify.scratch_dir(work),
                                    readable=[], settings=SETTINGS, as_root=True)
    args = options(command)
    assert "--unshare-user" not in args
    caps = [args[i + 1] for i, a in enumerate(args) if a == "--cap-add"]
    assert sorted(caps) == ["CAP_SETGID", "CAP_SETUID"]
    assert command[-3:-1] == ["256", "65534"]


SHELL_PROBE = ("id -u; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; "
               "touch /new 2>/dev/null && echo ROOT-WRITABLE; "
               "touch \"$HOME/x\" && echo SCRATCH-WRITABLE; "
               "unshare -U true 2>/dev/null && echo USERNS-ALLOWED; ls /proc | grep -c '^[0-9]'; "
               # RLIMIT_NPROC set inside, as the launcher does: counted in the namespace
               # (the forking shell exits at the first failed fork; its sleeps stay)
               "prlimit --nproc=16 sh -c 'for i in $(seq 40); do sleep 3 & done' 2>/dev/null; "
               "set -- /proc/[0-9]*; echo $#")


def test_the_unprivileged_mode_has_no_capabilities_and_no_user_namespaces(tmp_path,
                                                                           monkeypatch):
    # What a runner under its own (non-root) user gets. Run as uid 65534 when this test
    # runs as root; only the system is mounted (the shell needs nothing else).
    work, env = job_dir(tmp_path)
    scratch = verify.scratch_dir(work)
    monkeypatch.setattr(sandbox, "system_paths", lambda: [Path("/usr")])
    command = sandbox.bwrap_command(["/bin/sh", "-c", SHELL_PROBE], env=env,
                                    writable=scratch, readable=[], settings=SETTINGS,
                                    as_root=False)
    command = command[:command.index("--") + 1] + ["/bin/sh", "-c", SHELL_PROBE]
    if os.geteuid() == 0:
        os.chmod(tmp_path, 0o755)
        os.chmod(work, 0o755)
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    done = subprocess.run(command, env={}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    assert lines[0] == str(os.geteuid() or 65534)
    assert "CapEff:" in lines and lines[lines.index("CapEff:") + 1] == "0000000000000000"
    assert lines[lines.index("NoNewPrivs:") + 1] == "1"
    assert "SCRATCH-WRITABLE" in lines and "ROOT-WRITABLE" not in lines
    assert "USERNS-ALLOWED" not in lines
    assert int(lines[-2]) <= 5  # its own PID namespace: init, sh, ls, grep
    assert 8 < int(lines[-1]) <= 18  # init, sh and the sleeps up to the process limit
    assert not (scratch / "home" / "x").exists()  # the scratch tmpfs is gone with it


def test_without_bubblewrap_the_runner_refuses_to_run_pr_code(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty dir: no bwrap on PATH
    with pytest.raises(sandbox.SandboxUnavailable, match="VERIFY_SANDBOX=0"):
        sandbox.probe(SETTINGS)
    # the verify job turns it into an infrastructure error before the PR's code runs
    work, env = job_dir(tmp_path)
    src = work / "src"
    src.mkdir()
    from mlx_verify.workers.settings import RunnerSettings

    settings = RunnerSettings(redis_url="redis://127.0.0.1:1/0", git_url="file:///x",
                              work_dir=str(tmp_path), timeout_s=60, memory_mb=4096)
    with pytest.raises(verify.InfraError, match="bubblewrap .* not installed"):
        verify.run_check(settings, work, src, ["llama"], {}, env, "0")
    assert (work / "run-0" / "stderr.txt").read_bytes() == b""  # nothing ran


def test_a_runner_without_a_sandbox_does_not_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERIFY_")}
    env.update(PATH=str(tmp_path), REDIS_URL="redis://127.0.0.1:1/0")
    done = subprocess.run([str(Path(sys.executable).with_name("mlx-verify")), "worker",
                           "--queue", "verify", "--burst"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("mlx-verify: error: bubblewrap (bwrap) is not installed")
    assert "Traceback" not in done.stderr


def test_sandbox_settings(monkeypatch):
    for name in ("VERIFY_SANDBOX", "VERIFY_MAX_PROCESSES", "VERIFY_DISK_MB",
                 "VERIFY_SANDBOX_UID"):
        monkeypatch.delenv(name, raising=False)
    assert sandbox.load_sandbox_settings() == sandbox.SandboxSettings(True, 1024, 4096, 65534)
    monkeypatch.setenv("VERIFY_SANDBOX", "0")
    assert sandbox.load_sandbox_settings().enabled is False
    sandbox.probe(sandbox.load_sandbox_settings())  # unsandboxed: nothing to probe
    monkeypatch.setenv("VERIFY_SANDBOX", "off")
    with pytest.raises(SettingsError, match="VERIFY_SANDBOX must be 0 or 1"):
        sandbox.load_sandbox_settings()
    monkeypatch.setenv("VERIFY_SANDBOX", "1")
    monkeypatch.setenv("VERIFY_MAX_PROCESSES", "4")
    with pytest.raises(SettingsError, match="VERIFY_MAX_PROCESSES must be at least 16"):
        sandbox.load_sandbox_settings()


def test_the_macos_profile_denies_network_writes_forks_and_process_info(tmp_path):
    writable = tmp_path / 'odd "dir" \\ name'
    writable.mkdir()
    profile = sandbox.sandbox_exec_profile(writable)
    lines = profile.splitlines()
    assert lines[:4] == ["(version 1)", "(allow default)", "(deny network*)",
                         "(deny file-write*)"]
    quoted = str(writable.resolve()).replace("\\", "\\\\").replace('"', '\\"')
    assert f'(allow file-write* (subpath "{quoted}"))' in lines
    assert "(deny process-fork)" in lines
    assert "(deny process-info*)" in lines and "(allow process-info* (target self))" in lines
    # the only other writes: the null devices and the runner's descriptors
    allowed = [line for line in lines if line.startswith("(allow file-write*")]
    assert len(allowed) == 3 and "/dev/fd/" in allowed[2]
    if sys.platform != "darwin":
        with pytest.raises(sandbox.SandboxUnavailable, match="sandbox-exec is missing"):
            sandbox.sandbox_exec_command(["true"], writable=writable)
