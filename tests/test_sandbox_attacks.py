"""Malicious PRs against the runner's sandbox (workers/sandbox.py), one per attack class.

Each PR is the installed mlx_lm tree copied into a temp dir with llama.py edited to
attack when the check imports it. It runs through the verify job's own path
(workers.verify.run_check) in a runner process started the way a runner is: with
REDIS_URL (password included) and HF_TOKEN in its environment. Every verdict is judged
from outside the sandbox: the runner's files, the test's own listeners and Redis
servers, the host's /proc. The attack prints what it saw to stderr (the one channel a
check process has to the runner) and ends with exit status 3, so no check runs after it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from mlx_verify.workers import sandbox
from tests.conftest import installed_mlx_lm

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "s3cret-redis-password"
HF_TOKEN = "hf_s3cretTokenForTheAttackSuite"
RUNNER_TIMEOUT_S = 120
ATTACK_EXIT = 3

# A runner process: the verify job's run_check on a prepared job dir, outcome on stdout.
RUNNER = """
import json, sys
from pathlib import Path
from mlx_verify.workers.settings import load_runner_settings
from mlx_verify.workers import verify
work, src = Path(sys.argv[1]), Path(sys.argv[2])
# an open connection, as an rq work horse holds to Redis, even marked inheritable
import socket
held = socket.socketpair()
held[0].set_inheritable(True)
env = verify.scrubbed_env(work)
run = verify.run_check(load_runner_settings(), work, src, ["llama"], {"checks": ["layers"]},
                       env, "0")
print(json.dumps({"code": run["code"], "timeout": run["timeout"], "stderr": run["stderr"],
                  "has_results": run["results"] is not None}))
"""

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="bubblewrap is Linux-only")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def malicious_pr(tmp_path: Path, attack: str) -> tuple[Path, Path]:
    """A job dir holding a copy of the installed mlx_lm whose llama.py runs `attack` on
    import: (work, src)."""
    work = tmp_path / "job"
    src = work / "src"
    shutil.copytree(installed_mlx_lm(), src / "mlx_lm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    llama = src / "mlx_lm" / "models" / "llama.py"
    code = textwrap.dedent(attack).strip() + f"\nimport os as _os\n_os._exit({ATTACK_EXIT})\n"
    llama.write_text(f"exec({code!r})\n" + llama.read_text())
    return work, src


def runner_env(redis_port: int, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERIFY_")}
    env.update({"REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:{redis_port}/0",
                "HF_TOKEN": HF_TOKEN, "GITHUB_GIT_URL": "file:///nonexistent",
                "VERIFY_TIMEOUT": "60", **settings})
    return env


def start_runner(work: Path, src: Path, env: dict[str, str]) -> subprocess.Popen:
    # exec'd with the secrets in its initial environment, as a real runner is, so that
    # they are in its /proc/<pid>/environ
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(work), str(src)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(runner: subprocess.Popen) -> dict[str, Any]:
    stdout, stderr = runner.communicate(timeout=RUNNER_TIMEOUT_S)
    assert runner.returncode == 0, f"runner failed: {stderr[-3000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


def run_attack(tmp_path: Path, attack: str, redis_port: int = 1, **settings: str
               ) -> dict[str, Any]:
    """The runner's outcome of a malicious PR; "output": the whole stderr file the check
    process wrote (the outcome keeps only its tail)."""
    work, src = malicious_pr(tmp_path, attack)
    run = finish(start_runner(work, src, runner_env(redis_port, **settings)))
    stderr_file = work / "run-0" / "stderr.txt"
    run["output"] = "" if stderr_file.is_symlink() else \
        stderr_file.read_bytes().decode(errors="replace")
    return run


def host_processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(int(entry))
    return found


@pytest.fixture(scope="module", autouse=True)
def sandbox_available():
    # The suite is about the sandbox: a machine without one is a failure, not a skip.
    sandbox.probe(sandbox.load_sandbox_settings())


@pytest.fixture
def redis_servers(tmp_path):
    """Two real redis-servers on loopback, one with a password (as the runner's
    REDIS_URL says) and one without, the first also on a unix socket."""
    servers, processes = {}, []
    for name, extra in (("password", ["--requirepass", PASSWORD,
                                      "--unixsocket", str(tmp_path / "redis.sock")]),
                        ("open", [])):
        port = free_port()
        processes.append(subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp_path), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        client = redis.Redis(port=port, password=PASSWORD if name == "password" else None)
        servers[name] = (port, client)
    deadline = time.monotonic() + 10
    for _port, client in servers.values():
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
    servers["socket"] = tmp_path / "redis.sock"
    yield servers
    for process in processes:
        process.terminate()
        process.wait(10)


class Listener:
    """A TCP service on 127.0.0.1 that records every connection it accepts."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            with connection:
                connection.recv(100)
                connection.sendall(b"+OK\r\n")


ENV_AND_PROC = """
import os, sys
seen = ["ENVIRON " + repr(dict(os.environ))]
pids = [p for p in os.listdir("/proc") if p.isdigit()]
for pid in pids + [str(os.getppid())]:
    for name in ("environ", "cmdline"):
        try:
            seen.append(f"/proc/{pid}/{name} " + open(f"/proc/{pid}/{name}", "rb").read()
                        .decode(errors="replace"))
        except OSError as e:
            seen.append(f"/proc/{pid}/{name} {e}")
fds = []
for fd in os.listdir("/proc/self/fd"):
    try:
        fds.append(fd + "->" + os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        pass
sys.stderr.write(f"ATTACK-PROCS {len(pids)}\\n" + "\\n".join(seen) + "\\n")
sys.stderr.write("ATTACK-FDS " + " ".join(fds) + "\\n")
"""


def read_files(paths: list[Path]) -> str:
    """Attack code that prints whatever it can read of `paths`."""
    return ("import sys\n"
            f"for path in {[str(p) for p in paths]!r}:\n"
            "    try:\n"
            "        sys.stderr.write(f'ATTACK-READ {path} ' + open(path).read() + '\\n')\n"
            "    except OSError as e:\n"
            "        sys.stderr.write(f'ATTACK-UNREADABLE {path} {e}\\n')\n")


def test_environment_and_proc_hold_no_secret(tmp_path):
    # and neither do the runner's files: its env file (like /etc/mlx-verify/runner.env)
    env_file = tmp_path / "runner.env"
    env_file.write_text(f"REDIS_URL=redis://:{PASSWORD}@127.0.0.1:1/0\n")
    run = run_attack(tmp_path, ENV_AND_PROC + read_files([env_file, Path("/etc/shadow")]))
    assert run["code"] == ATTACK_EXIT, run
    stderr = run["output"]
    assert "ATTACK-PROCS" in stderr and "ENVIRON" in stderr, stderr
    assert "scratch/home" in stderr  # the attack did read its own environment
    assert PASSWORD not in stderr and HF_TOKEN not in stderr and "REDIS_URL" not in stderr
    assert "ATTACK-READ" not in stderr and stderr.count("ATTACK-UNREADABLE") == 2
    # no descriptor of the runner's but stdin, stdout, stderr and the results file
    fds = stderr.split("ATTACK-FDS ")[1].splitlines()[0].split()
    assert "socket:" not in " ".join(fds), fds
    assert len(fds) <= 5, fds  # 0, 1, 2, results, and the listing's own
    # a PID namespace of its own: bubblewrap's init and the check process, nothing else
    assert int(stderr.split("ATTACK-PROCS ")[1].split()[0]) <= 3, stderr


def test_environment_attack_finds_the_secret_without_the_sandbox(tmp_path):
    # The control: the same attack, VERIFY_SANDBOX=0 (trusted local use only), reads the
    # runner's REDIS_URL from /proc/<parent>/environ. The test above can fail.
    run = run_attack(tmp_path, ENV_AND_PROC, VERIFY_SANDBOX="0")
    assert run["code"] == ATTACK_EXIT, run
    assert PASSWORD in run["output"] and HF_TOKEN in run["output"]


SOCKETS = """
import socket, sys
for port in {ports}:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        s.sendall(b"AUTH {password}\\r\\nSET pwned 1\\r\\n")
        sys.stderr.write(f"ATTACK-CONNECTED {{port}} {{s.recv(100)!r}}\\n")
    except OSError as e:
        sys.stderr.write(f"ATTACK-REFUSED {{port}} {{e}}\\n")
for path in ["{unix}"]:
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(b"AUTH {password}\\r\\nSET pwned 1\\r\\n")
        sys.stderr.write(f"ATTACK-CONNECTED {{path}} {{s.recv(100)!r}}\\n")
    except OSError as e:
        sys.stderr.write(f"ATTACK-REFUSED {{path}} {{e}}\\n")
"""


def socket_attack(listener: Listener, servers: dict) -> str:
    ports = [listener.port, servers["password"][0], servers["open"][0]]
    return SOCKETS.format(ports=ports, password=PASSWORD, unix=servers["socket"])


def test_no_loopback_service_or_redis_is_reachable(tmp_path, redis_servers):
    listener = Listener()
    run = run_attack(tmp_path, socket_attack(listener, redis_servers),
                     redis_port=redis_servers["password"][0])
    assert run["code"] == ATTACK_EXIT, run
    assert "ATTACK-CONNECTED" not in run["stderr"]
    assert run["stderr"].count("ATTACK-REFUSED") == 4, run["stderr"]
    assert listener.accepted == 0
    for name in ("password", "open"):
        assert redis_servers[name][1].get("pwned") is None


def test_socket_attack_reaches_redis_without_the_sandbox(tmp_path, redis_servers):
    listener = Listener()
    run = run_attack(tmp_path, socket_attack(listener, redis_servers),
                     redis_port=redis_servers["password"][0], VERIFY_SANDBOX="0")
    assert run["stderr"].count("ATTACK-CONNECTED") == 4, run["stderr"]
    assert listener.accepted == 1
    assert redis_servers["password"][1].get("pwned") == b"1"


DAEMON = """
import os, sys, time
up = os.path.join(os.environ["TMPDIR"], "daemon-up")
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open(up, "w").close()
        os.execv(sys.executable, [sys.executable, "-c",
                 "import time\\nwhile True: time.sleep(0.2)", "{tag}"])
    os._exit(0)
for _ in range(100):
    if os.path.exists(up):
        break
    time.sleep(0.1)
sys.stderr.write(f"ATTACK-DAEMON up={{os.path.exists(up)}}\\n")
time.sleep(3)  # while the test watches the host's /proc
"""


def test_a_daemon_does_not_outlive_its_job(tmp_path):
    tag = f"mlx-verify-attack-daemon-{uuid.uuid4().hex}"
    work, src = malicious_pr(tmp_path, DAEMON.format(tag=tag))
    runner = start_runner(work, src, runner_env(1))
    seen_running = False
    while runner.poll() is None and not seen_running:
        seen_running = bool(host_processes_mentioning(tag))
        time.sleep(0.1)
    run = finish(runner)
    assert "ATTACK-DAEMON up=True" in run["stderr"], run
    assert seen_running  # it did run, detached (setsid, double fork) ...
    assert host_processes_mentioning(tag) == []  # ... and ended with the job


HANG = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(600)", "{tag}"])
time.sleep(600)
"""


def test_a_hang_is_killed_with_its_whole_tree(tmp_path):
    tag = f"mlx-verify-attack-hang-{uuid.uuid4().hex}"
    work, src = malicious_pr(tmp_path, HANG.format(tag=tag))
    started = time.monotonic()
    runner = start_runner(work, src, runner_env(1, VERIFY_TIMEOUT="15"))
    seen_running = False
    while runner.poll() is None:
        seen_running = seen_running or bool(host_processes_mentioning(tag))
        time.sleep(0.2)
    run = finish(runner)
    assert run["timeout"] is True and run["code"] is None, run
    assert time.monotonic() - started < 60
    assert seen_running  # the detached sleep ran ...
    assert host_processes_mentioning(tag) == []  # ... and was killed with the hang


def test_planted_pth_files_and_cache_entries_do_not_reach_the_host(tmp_path):
    import sysconfig

    site_packages = Path(sysconfig.get_paths()["purelib"])
    targets = {
        "pth": site_packages / f"zz-attack-{uuid.uuid4().hex}.pth",
        "engine": ROOT / "checks" / f"attack-{uuid.uuid4().hex}.py",
        "runner-cache": tmp_path / "runner-cache" / "planted",
        # the runner user's own checkpoint cache (local checks, the nightly sweep)
        "user-cache": Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "mlx-verify" / f"planted-{uuid.uuid4().hex}",
        "tmp": Path("/tmp") / f"attack-{uuid.uuid4().hex}",
        "tree": tmp_path / "job" / "src" / "mlx_lm" / "models" / "planted.py",
        "run-dir": tmp_path / "job" / "run-0" / "planted",
    }
    (tmp_path / "runner-cache").mkdir()
    attack = ("import os, sys\n"
              f"targets = {dict((k, str(v)) for k, v in targets.items())!r}\n"
              "for name, path in targets.items():\n"
              "    try:\n"
              "        os.makedirs(os.path.dirname(path), exist_ok=True)\n"
              "        with open(path, 'w') as f:\n"
              "            f.write('import os; os.system(\"touch /tmp/pwned\")\\n')\n"
              "        sys.stderr.write(f'ATTACK-WROTE {name}\\n')\n"
              "    except OSError as e:\n"
              "        sys.stderr.write(f'ATTACK-DENIED {name} {e}\\n')\n"
              # a cache entry the next run (or the next job) would load
              "cache = os.environ['MLX_VERIFY_CACHE']\n"
              "open(os.path.join(cache, 'planted-checkpoint'), 'w').write('x')\n"
              "sys.stderr.write('ATTACK-CACHE-PLANTED\\n')\n")
    try:
        run = run_attack(tmp_path, attack)
    finally:
        planted = [path for path in targets.values() if path.exists()]
        for path in planted:  # never leave a planted file behind, even when this fails
            path.unlink()
    assert planted == []
    assert run["code"] == ATTACK_EXIT, run
    stderr = run["stderr"]
    assert "ATTACK-CACHE-PLANTED" in stderr, stderr  # its own cache: a private tmpfs
    assert "ATTACK-WROTE" not in stderr, stderr
    assert stderr.count("ATTACK-DENIED") == len(targets), stderr
    # the scratch dir the runner keeps on the host is untouched: the next run of the job
    # starts with empty caches
    scratch = tmp_path / "job" / "scratch"
    assert sorted(p.name for p in scratch.rglob("*")) == ["cache", "hf", "home", "tmp"]


FORK_BOMB = """
import os, sys, time
children = 0
error = None
for _ in range(2000):  # bounded: at most 2000 forks even without a limit
    try:
        pid = os.fork()
    except OSError as e:
        error = e
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children += 1
sys.stderr.write(f"ATTACK-FORKS {{children}} {{error!r}}\\n")
"""


def test_a_fork_bomb_stops_at_the_process_limit(tmp_path):
    run = run_attack(tmp_path, FORK_BOMB.format(), VERIFY_MAX_PROCESSES="64")
    assert run["code"] == ATTACK_EXIT, run
    line = run["stderr"].split("ATTACK-FORKS ")[1].splitlines()[0]
    children, error = int(line.split()[0]), line.split(" ", 1)[1]
    assert "Resource temporarily unavailable" in error, line
    assert children < 64
    assert host_processes_mentioning(str(tmp_path / "job" / "src")) == []


def test_memory_exhaustion_stops_at_the_address_space_limit(tmp_path):
    attack = ("import sys\n"
              "try:\n"
              "    block = bytearray(6 * 1024 ** 3)\n"
              "    sys.stderr.write(f'ATTACK-ALLOCATED {len(block)}\\n')\n"
              "except MemoryError:\n"
              "    sys.stderr.write('ATTACK-MEMORY-ERROR\\n')\n")
    run = run_attack(tmp_path, attack, VERIFY_MEMORY_MB="3072")
    assert run["code"] == ATTACK_EXIT, run
    assert "ATTACK-MEMORY-ERROR" in run["stderr"], run["stderr"]


def test_a_full_disk_stops_at_the_scratch_size(tmp_path):
    attack = ("import os, sys\n"
              "path = os.path.join(os.environ['TMPDIR'], 'fill')\n"
              "written = 0\n"
              "try:\n"
              "    with open(path, 'wb') as f:\n"
              "        for _ in range(256):  # bounded: 256 MiB at most\n"
              "            f.write(b'x' * 1024 ** 2); f.flush(); written += 1\n"
              "except OSError as e:\n"
              "    sys.stderr.write(f'ATTACK-DISK {written} {e}\\n')\n")
    run = run_attack(tmp_path, attack, VERIFY_DISK_MB="64")
    assert run["code"] == ATTACK_EXIT, run
    line = run["stderr"].split("ATTACK-DISK ")[1].splitlines()[0]
    assert "No space left on device" in line and int(line.split()[0]) <= 64, line


RESULT_LINKS = """
import os, sys
# The runner's results and stderr files, as the descriptors the check process got name
# them; replace both with links to /dev/zero.
paths = []
for fd in os.listdir("/proc/self/fd"):
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        continue  # the descriptor of the listing itself
    if path.endswith(("results.json", "stderr.txt")):
        paths.append(path)
sys.stderr.write(f"ATTACK-FOUND {len(paths)}\\n")
for path in paths:
    try:
        os.remove(path)
        os.symlink("/dev/zero", path)
        sys.stderr.write(f"ATTACK-LINKED {path}\\n")
    except OSError as e:
        sys.stderr.write(f"ATTACK-DENIED {path} {e}\\n")
"""


@pytest.mark.parametrize("sandboxed", ["1", "0"])
def test_results_and_stderr_replaced_by_links_to_dev_zero(tmp_path, sandboxed):
    # Sandboxed, the run dir is not in the check process's mount namespace; without the
    # sandbox it is, and the links are made: the runner still reads a bounded amount,
    # without following them.
    run = run_attack(tmp_path, RESULT_LINKS, VERIFY_SANDBOX=sandboxed)
    assert run["code"] == ATTACK_EXIT, run
    stderr_file = tmp_path / "job" / "run-0" / "stderr.txt"
    if sandboxed == "1":
        assert "ATTACK-FOUND 2" in run["stderr"], run["stderr"]
        assert run["stderr"].count("ATTACK-DENIED") == 2, run["stderr"]
        assert not stderr_file.is_symlink()
    else:
        assert stderr_file.is_symlink()  # the attack ran, and the read was refused
        assert run["stderr"].startswith("(stderr unreadable: ")
    assert run["has_results"] is False


def test_reading_a_link_a_fifo_or_a_large_file_is_bounded(tmp_path):
    link = tmp_path / "results.json"
    link.symlink_to("/dev/zero")
    with pytest.raises(OSError):
        sandbox.read_regular_file(link, 1024)
    fifo = tmp_path / "stderr.txt"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        sandbox.read_regular_file(fifo, 1024)  # and does not block
    big = tmp_path / "big"
    big.write_bytes(b"a" * 10000 + b"END")
    assert sandbox.read_regular_file(big, 3, tail=True) == b"END"
    assert len(sandbox.read_regular_file(big, 100)) == 100
