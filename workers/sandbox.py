"""The sandbox of the process that imports a PR's code (runs on runners).

`run()` starts one command (the `mlx-verify check` of a verify job) so that it
- sees no network: on Linux a new network namespace (bubblewrap `--unshare-net`), so not
  even the runner's loopback services (Redis) or abstract unix sockets are reachable, and
  no host directory holding unix sockets (/tmp, /run, /var) is mounted; on macOS a
  `sandbox-exec` profile denying `network*`;
- sees no other process: its own PID namespace with a fresh /proc (Linux), so no
  /proc/<pid>/environ of the runner; the environment is set at launch from a scrubbed
  dict, and bubblewrap itself is started with an empty environment (the sandbox's
  /proc/1/environ is bubblewrap's own, so `--clearenv` alone would leave the runner's
  variables readable there);
- writes nowhere but `writable`: on Linux a size-limited tmpfs mounted over that path, new
  for every run and gone when it ends (HOME, TMPDIR, caches); the system, the Python
  install, the venv and the engine are read-only binds, the PR tree and inputs too. The
  results leave through a file descriptor the runner opened (`/dev/fd/N`), stdout and
  stderr through two more: the runner's files are not reachable by path;
- is bounded: address space (RLIMIT_AS), file size (RLIMIT_FSIZE), processes
  (RLIMIT_NPROC, set inside the sandbox), no core dumps, wall time;
- ends whole: when the command exits or times out, the runner kills bubblewrap's process
  group and bubblewrap's init (PID 1 of the namespace, also `--die-with-parent`), whose
  death takes every process of the namespace with it, double-forked daemons included,
  and waits for that (a pidfd of the init) before run() returns.

A runner started as root runs the sandboxed command as an unprivileged uid
(VERIFY_SANDBOX_UID, default 65534 `nobody`): the kernel does not apply RLIMIT_NPROC to
root. Any other runner user gets a user namespace of its own (`--unshare-user
--disable-userns`, no capabilities).

When the sandbox cannot be made (no bubblewrap, namespaces refused), `probe()` and
`run()` raise SandboxUnavailable: PR code is never run unsandboxed unless VERIFY_SANDBOX=0
says so (trusted local use only).
"""

from __future__ import annotations

import errno
import os
import re
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .settings import SettingsError, int_setting

# Read-only from /etc: the dynamic linker's cache, the BLAS alternatives symlinks
# (libblas.so.3 points into /etc/alternatives), users and groups, the time zone.
# Not /etc whole: it may hold the runner's own settings (/etc/mlx-verify/runner.env).
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "passwd", "group",
             "nsswitch.conf", "localtime", "timezone")
MERGED_USR = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
PROBE_TIMEOUT_S = 30
NAMESPACE_EXIT_TIMEOUT_S = 30  # for the kernel to end every process of a PID namespace
CHILD_PID = re.compile(rb'"child-pid": *([0-9]+)[,\s}]')
UNSANDBOXED_HINT = ("PR code is not run; install bubblewrap and allow user namespaces "
                    "(docs/deploy.md), or set VERIFY_SANDBOX=0 for trusted local use only")


class SandboxUnavailable(Exception):
    """The sandbox cannot be made on this machine: one line saying why."""


@dataclass(frozen=True)
class SandboxSettings:
    enabled: bool  # VERIFY_SANDBOX, default 1; 0 runs PR code unsandboxed
    max_processes: int  # VERIFY_MAX_PROCESSES: RLIMIT_NPROC inside the sandbox
    disk_mb: int  # VERIFY_DISK_MB: size of the writable tmpfs (Linux), and of /dev/shm
    uid: int  # VERIFY_SANDBOX_UID: the uid a root runner's sandbox runs as


def load_sandbox_settings() -> SandboxSettings:
    enabled = (os.environ.get("VERIFY_SANDBOX") or "1").strip()
    if enabled not in ("0", "1"):
        raise SettingsError(f"VERIFY_SANDBOX must be 0 or 1, not {enabled!r}")
    return SandboxSettings(
        enabled=enabled == "1",
        max_processes=int_setting("VERIFY_MAX_PROCESSES", 1024, minimum=16),
        disk_mb=int_setting("VERIFY_DISK_MB", 4096, minimum=64),
        uid=int_setting("VERIFY_SANDBOX_UID", 65534, minimum=1),
    )


def kind() -> str:
    """The sandbox of this platform: "bwrap" (Linux) or "sandbox-exec" (macOS)."""
    return "sandbox-exec" if sys.platform == "darwin" else "bwrap"


def system_paths() -> list[Path]:
    """What the check process reads: the system, the Python install, the venv, the engine
    (an editable install's source too). Read-only; nested paths are dropped."""
    import mlx_verify
    import mlx_verify.checks
    import mlx_verify.workers
    from mlx_verify.checks import compat, environments

    # the package's own folder, checks/ and workers/ (a source tree maps them there)
    paths = [Path("/usr"), Path(sys.base_prefix), Path(sys.prefix),
             Path(sys.executable).resolve().parent,
             Path(mlx_verify.__file__).resolve().parent,
             Path(mlx_verify.checks.__file__).resolve().parent,
             # workers/: the capture (workers/capture.py) runs from it; code, no settings
             Path(mlx_verify.workers.__file__).resolve().parent]
    # the validated locks (environment.lock), and the other validated environments the
    # check may run in for a model_type only a newer transformers knows
    paths += [d for d in compat.lock_dirs() if d.is_dir()]
    for python in environments.configured():
        paths += [Path(python).parent.parent, Path(python).resolve().parent.parent]
    kept: list[Path] = []
    for path in sorted({p.resolve() for p in paths if p.exists()},
                       key=lambda p: len(p.parts)):
        if not any(path.is_relative_to(k) for k in kept):
            kept.append(path)
    return kept


LAUNCHER = """\
import os, resource, sys
nproc, uid = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
if uid >= 0:
    os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
os.execv(sys.argv[3], sys.argv[3:])
"""


def bwrap_command(command: list[str], *, env: dict[str, str], writable: Path,
                  readable: list[Path], settings: SandboxSettings,
                  as_root: bool | None = None, info_fd: int | None = None,
                  hidden: tuple[Path, ...] = ()) -> list[str]:
    """The bubblewrap command line that runs `command` sandboxed (see the module doc).
    bubblewrap writes to `info_fd` once the sandbox is made. Each `hidden` directory (a
    package inside a read-only bind) is covered by an empty read-only tmpfs."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"bubblewrap (bwrap) is not installed; {UNSANDBOXED_HINT}")
    as_root = os.geteuid() == 0 if as_root is None else as_root
    args = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session",
            "--hostname", "sandbox"]
    if as_root:
        # root creates the namespaces without a user namespace; the launcher drops to an
        # unprivileged uid before exec, which ends every capability
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
    mounts: list[list[str]] = []  # bubblewrap options, each list ending in its mount point
    for name in MERGED_USR:
        top = Path("/") / name
        if top.is_symlink():
            mounts.append(["--symlink", os.readlink(top), str(top)])
        elif top.is_dir():
            mounts.append(["--ro-bind", str(top), str(top)])
    for path in system_paths():
        mounts.append(["--ro-bind", str(path), str(path)])
    for name in ETC_FILES:
        if os.path.lexists(f"/etc/{name}"):
            mounts.append(["--ro-bind", f"/etc/{name}", f"/etc/{name}"])
    if Path("/sys/devices/system/cpu").is_dir():  # CPU count and topology for BLAS
        mounts.append(["--ro-bind", "/sys/devices/system/cpu", "/sys/devices/system/cpu"])
    size = str(settings.disk_mb * 1024 * 1024)
    mounts += [["--proc", "/proc"], ["--dev", "/dev"],
               ["--size", size, "--tmpfs", "/dev/shm"],
               ["--perms", "0777", "--size", size, "--tmpfs", str(writable)]]
    mounts += [["--perms", "0777", "--dir", str(sub)]
               for sub in sorted(p for p in writable.iterdir() if p.is_dir())]
    mounts += [["--ro-bind", str(path), str(path)] for path in readable]
    for path in hidden:  # after the binds they sit in; mounted empty, then read-only
        mounts += [["--perms", "0555", "--size", "4096", "--tmpfs", str(path)],
                   ["--remount-ro", str(path)]]
    # bubblewrap makes missing parents of a mount point mode 0700, which the sandbox's uid
    # could not pass through; make them first, 0755
    targets = [Path(m[-1]) for m in mounts]
    parents: list[Path] = []
    for target in targets:
        for parent in reversed(target.parents[:-1]):
            if parent not in parents and not any(parent == t or parent.is_relative_to(t)
                                                 for t in targets):
                parents.append(parent)
    for parent in parents:
        args += ["--perms", "0755", "--dir", str(parent)]
    for mount in mounts:
        args += mount
    args += ["--remount-ro", "/"]  # bubblewrap's own root tmpfs: no writes beside the mounts
    if info_fd is not None:
        args += ["--info-fd", str(info_fd)]
    args += ["--chdir", str(writable), "--clearenv"]
    for key, value in sorted(env.items()):
        args += ["--setenv", key, value]
    launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(settings.max_processes),
                str(settings.uid if as_root else -1)]
    return [*args, "--", *launcher, *command]


CAPTURE_HIDDEN = ("transformers", "torch", "mlx_lm")


def hidden_packages(names: tuple[str, ...] = CAPTURE_HIDDEN) -> tuple[Path, ...]:
    """The installed directories of these packages, found without importing them: the
    capture (workers/capture.py) runs with them hidden, so PR code cannot call them:
    transformers and torch would compute the reference, and the installed (released)
    mlx_lm is a ready-made correct port of every model it has."""
    import importlib.util

    from mlx_verify.checks import environments

    found: list[Path] = []
    for name in names:
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            if Path(location).is_dir():
                found.append(Path(location).resolve())
        # the other validated environments (system_paths binds them for the check run)
        for python in environments.configured():
            for root in {Path(python).parent.parent, Path(python).resolve().parent.parent}:
                found += [p.resolve() for p in root.glob(f"lib/python*/site-packages/{name}")
                          if p.is_dir()]
    return tuple(sorted(set(found)))


def _sbpl(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sandbox_exec_profile(writable: Path, hidden: tuple[Path, ...] = ()) -> str:
    """The macOS sandbox profile: everything the default allows, except the network, any
    write outside `writable` (and /dev/null), new processes and other processes' info,
    and any read under a `hidden` directory."""
    real = os.path.realpath(writable)  # /var/folders/... is /private/var/folders/...
    unreadable = [f"(deny file-read* (subpath {_sbpl(os.path.realpath(path))}))"
                  for path in hidden]
    return "\n".join([
        "(version 1)",
        "(allow default)",
        "(deny network*)",
        "(deny file-write*)",
        f"(allow file-write* (subpath {_sbpl(real)}))",
        '(allow file-write* (literal "/dev/null") (literal "/dev/zero") (literal "/dev/tty"))',
        # the results file the runner opened, reopened as /dev/fd/N by `--json`
        '(allow file-write* (regex #"^/dev/fd/[0-9]+$"))',
        # no new processes: no daemons outliving the job, no fork bombs (the engine runs
        # none; a failing `git rev-parse` of the tree only loses the reported SHA)
        "(deny process-fork)",
        "(deny process-info*)",
        "(allow process-info* (target self))",
        *unreadable,
        "",
    ])


def sandbox_exec_command(command: list[str], *, writable: Path,
                         hidden: tuple[Path, ...] = ()) -> list[str]:
    if not Path("/usr/bin/sandbox-exec").is_file():
        raise SandboxUnavailable(f"/usr/bin/sandbox-exec is missing; {UNSANDBOXED_HINT}")
    return ["/usr/bin/sandbox-exec", "-p", sandbox_exec_profile(writable, hidden), *command]


def _limits(memory_mb: int, file_size: int) -> None:
    # In the child between fork and exec; inherited by everything inside the sandbox.
    for limit, value in ((resource.RLIMIT_AS, memory_mb * 1024 * 1024),
                         (resource.RLIMIT_FSIZE, file_size),
                         (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):
            pass  # macOS does not enforce RLIMIT_AS; the wall-time limit still holds


def probe(settings: SandboxSettings) -> None:
    """Raise SandboxUnavailable unless a sandbox can be made here (a no-op sandboxed
    `true` in a scratch dir); nothing when VERIFY_SANDBOX=0."""
    if not settings.enabled:
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mlx-verify-probe-") as scratch:
        writable = Path(scratch)
        os.chmod(writable, 0o755)
        if kind() == "bwrap":
            command = bwrap_command(["/bin/true"], env={}, writable=writable, readable=[],
                                    settings=settings)
        else:
            command = sandbox_exec_command(["/usr/bin/true"], writable=writable)
        try:
            done = subprocess.run(command, env={}, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=PROBE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SandboxUnavailable(f"{kind()} could not start: {e}; "
                                     f"{UNSANDBOXED_HINT}") from None
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()
        raise SandboxUnavailable(f"{kind()} cannot make the sandbox here "
                                 f"({why[-1] if why else f'exit {done.returncode}'}); "
                                 f"{UNSANDBOXED_HINT}")


@dataclass(frozen=True)
class Finished:
    code: int | None  # exit status (negative: killed by that signal); None on timeout
    timeout: bool


def run(command: list[str], *, env: dict[str, str], writable: Path, readable: list[Path],
        settings: SandboxSettings, memory_mb: int, file_size: int, timeout_s: float,
        stdout: IO[bytes], stderr: IO[bytes], pass_fds: tuple[int, ...] = (),
        hidden: tuple[Path, ...] = ()) -> Finished:
    """Run `command` sandboxed with exactly `env`, `writable` as its only writable path
    (and working dir), `readable` (the PR tree, inputs) read-only; stdout, stderr and
    `pass_fds` (regular files, which it may reopen as /dev/fd/N) are the only runner
    files it can write. Every process it starts has ended when run() returns, also on
    timeout. SandboxUnavailable when bubblewrap cannot make the sandbox. `hidden`
    directories are empty inside it (bubblewrap) or unreadable (sandbox-exec); see
    hidden_packages."""
    info_read = info_write = None
    if not settings.enabled:
        full, launch_env = command, env
    elif kind() == "bwrap":
        if os.geteuid() == 0:
            for fd in pass_fds:  # `/dev/fd/N` reopens the file: the sandbox's uid must own it
                os.fchown(fd, settings.uid, -1)
        info_read, info_write = os.pipe()
        full = bwrap_command(command, env=env, writable=writable, readable=readable,
                             settings=settings, info_fd=info_write, hidden=hidden)
        launch_env, pass_fds = {}, (*pass_fds, info_write)
    else:
        full, launch_env = sandbox_exec_command(command, writable=writable,
                                                hidden=hidden), env
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            full, cwd=writable, env=launch_env, stdin=subprocess.DEVNULL, stdout=stdout,
            stderr=stderr, pass_fds=pass_fds, start_new_session=True,
            preexec_fn=lambda: _limits(memory_mb, file_size))
    finally:
        if info_write is not None:
            os.close(info_write)
    made, namespace = True, None  # namespace: a pidfd of the sandbox's PID 1
    if info_read is not None:
        made, namespace = _sandbox_init(info_read, timeout_s)
    try:
        code: int | None = process.wait(timeout=max(0.0, timeout_s -
                                                    (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        code = None
    finally:
        # The whole group (bubblewrap, or the command and its children unsandboxed),
        # then bubblewrap's init, whose death takes its PID namespace with it. bubblewrap
        # exits with the command, while its init may still be reaping: wait until the
        # namespace is gone, so that nothing of the job outlives run().
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
        if namespace is not None:
            try:
                signal.pidfd_send_signal(namespace, signal.SIGKILL)
            except ProcessLookupError:
                pass
            select.select([namespace], [], [], NAMESPACE_EXIT_TIMEOUT_S)
            os.close(namespace)
    if not made and code is not None:
        # bubblewrap stopped before the command ran: its reason is on stderr
        why = read_regular_file(Path(f"/proc/self/fd/{stderr.fileno()}"), 4096)
        lines = [line for line in why.decode(errors="replace").splitlines() if line.strip()]
        raise SandboxUnavailable(f"bubblewrap could not make the sandboxed process "
                                 f"({lines[0] if lines else f'exit {code}'}); "
                                 f"{UNSANDBOXED_HINT}")
    return Finished(code=code, timeout=code is None)


def _sandbox_init(info_read: int, timeout_s: float) -> tuple[bool, int | None]:
    """Whether the sandbox was made, and a pidfd of its PID 1, from bubblewrap's
    --info-fd JSON, written once the sandbox is made (the pipe closes empty when
    bubblewrap stops before); no pidfd when PID 1 has already gone."""
    data = b""
    deadline = time.monotonic() + timeout_s
    try:  # the JSON arrives in pieces, then bubblewrap closes its end (read to the end:
        # closing ours first would kill bubblewrap with SIGPIPE)
        while True:
            ready, _, _ = select.select([info_read], [], [],
                                        max(0.0, deadline - time.monotonic()))
            chunk = os.read(info_read, 4096) if ready else b""
            if not chunk:
                break
            data += chunk
    finally:
        os.close(info_read)
    found = CHILD_PID.search(data)
    if found is None:
        return False, None
    try:
        return True, os.pidfd_open(int(found.group(1)))
    except ProcessLookupError:
        return True, None  # already gone: nothing left to wait for


def read_regular_fd(fd: int, max_bytes: int, tail: bool = False) -> bytes:
    """At most max_bytes of an open regular file (its last ones with tail=True).
    OSError when it is not a regular file."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, f"not a regular file (mode {stat.filemode(info.st_mode)})")
    start = max(0, info.st_size - max_bytes) if tail else 0
    return os.pread(fd, max_bytes, start)


def read_regular_file(path: Path, max_bytes: int, tail: bool = False) -> bytes:
    """read_regular_fd of a path, never following a symlink and never blocking on a FIFO
    or device: a results or stderr file the PR replaced with a link to /dev/zero is an
    OSError, not an endless read."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return read_regular_fd(fd, max_bytes, tail)
    finally:
        os.close(fd)
