"""Settings from the environment, checked at start-up: the runner's, and the parsers the
App's settings (app/settings.py) share.

A missing or invalid setting stops start-up with one line naming it (SettingsError).
The runner (verify queues) reads only what it needs: REDIS_URL and GITHUB_GIT_URL, so a
runner machine never needs, and should never have, the App key or webhook secret. This
module imports nothing of app/.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlparse


class SettingsError(Exception):
    """One line naming the setting that is missing or invalid."""


@dataclass(frozen=True)
class RunnerSettings:
    redis_url: str
    git_url: str  # clone URLs are {git_url}/{owner}/{repo}.git
    work_dir: str  # parent of the per-job work dirs
    timeout_s: int  # wall time of one `mlx-verify check` run
    memory_mb: int  # address-space limit of that run (Linux; advisory on macOS)


def env_value(name: str) -> str | None:
    value = os.environ.get(name)
    return value.strip() if value and value.strip() else None


def required(name: str) -> str:
    value = env_value(name)
    if value is None:
        raise SettingsError(f"{name} is not set")
    return value


def url_setting(name: str, default: str | None, schemes: tuple[str, ...]) -> str:
    value = env_value(name) or default
    if value is None:
        raise SettingsError(f"{name} is not set")
    parsed = urlparse(value)
    if parsed.scheme not in schemes or (parsed.scheme != "file" and not parsed.netloc):
        raise SettingsError(f"{name} is not a {'/'.join(schemes)} URL: {value!r}")
    return value.rstrip("/")


def int_setting(name: str, default: int, minimum: int = 1) -> int:
    value = env_value(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise SettingsError(f"{name} is not an integer: {value!r}") from None
    if number < minimum:
        raise SettingsError(f"{name} must be at least {minimum}")
    return number


def flag_setting(name: str, default: bool) -> bool:
    value = env_value(name)
    if value is None:
        return default
    if value not in ("0", "1"):
        raise SettingsError(f"{name} must be 0 or 1, not {value!r}")
    return value == "1"


def redis_url() -> str:
    return url_setting("REDIS_URL", None, ("redis", "rediss", "unix"))


def load_runner_settings() -> RunnerSettings:
    work_dir = env_value("VERIFY_WORK_DIR") or os.path.join(
        os.environ.get("TMPDIR", "/tmp"), "mlx-verify-jobs")
    return RunnerSettings(
        redis_url=redis_url(),
        git_url=url_setting("GITHUB_GIT_URL", "https://github.com", ("https", "http", "file")),
        work_dir=work_dir,
        timeout_s=int_setting("VERIFY_TIMEOUT", 1800),
        memory_mb=int_setting("VERIFY_MEMORY_MB", 16384, minimum=512),
    )


def connect_redis(url: str):
    """A Redis client that has answered a PING; SettingsError naming REDIS_URL otherwise."""
    import redis

    try:
        client = redis.Redis.from_url(url)
        client.ping()
    except (redis.RedisError, ValueError) as e:
        raise SettingsError(f"REDIS_URL: cannot connect ({str(e).splitlines()[0]})") from None
    return client
