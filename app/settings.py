"""The App's settings from the environment, checked at start-up: the key, the webhook
secret, the store's bounds (the parsers and the runner's settings: workers/settings.py).

A missing or invalid setting stops start-up with one line naming it (SettingsError).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlx_verify.workers.settings import (  # noqa: F401 (SettingsError, connect_redis: app's imports)
    SettingsError,
    connect_redis,
    env_value,
    flag_setting,
    int_setting,
    redis_url,
    required,
    url_setting,
)


@dataclass(frozen=True)
class AppSettings:
    redis_url: str
    app_id: int
    private_key: str
    webhook_secret: str
    api_url: str
    git_url: str
    dashboard_url: str | None
    # Optional tuning: only these model_types are run automatically (None: all),
    # and at most this many per automatic run (a shared-module change can plan ~80).
    auto_model_types: tuple[str, ...] | None
    max_model_types: int
    auto_checks: tuple[str, ...]  # checks of automatic runs (empty: all)
    # Also check the PR's base commit, to tell new findings from pre-existing ones
    # (up to twice the runner time; VERIFY_BASELINE=0 turns it off).
    baseline: bool = True


# Values from examples and templates that must never reach production.
PLACEHOLDERS = ("change-me", "changeme", "change_me", "replace-me", "replaceme", "secret",
                "password", "your-secret", "example", "xxx", "todo", "test")
WEBHOOK_SECRET_MIN_CHARS = 16


def secret(name: str, minimum: int, value: str | None = None) -> str:
    """A secret setting: set, not a placeholder, at least `minimum` characters. The
    error names the setting, never the value."""
    value = required(name) if value is None else value
    lowered = value.lower()
    if lowered in PLACEHOLDERS or any(p in lowered for p in PLACEHOLDERS[:5]) or \
            len(set(value)) == 1:
        raise SettingsError(f"{name} is a placeholder; set a long random string "
                            "(python3 -c 'import secrets; print(secrets.token_hex(32))')")
    if len(value) < minimum:
        raise SettingsError(f"{name} must be at least {minimum} characters")
    return value


@dataclass(frozen=True)
class StoreLimits:
    """Bounds of the run store (app.store), so that stored results can never fill the
    Redis that also takes the webhooks."""

    max_bytes: int  # all stored runs together (meta, results, logs)
    results_max_bytes: int  # one run's results JSON; larger ones are not kept
    ttl_s: int  # a run is dropped this long after it was queued


def load_store_limits() -> StoreLimits:
    return StoreLimits(max_bytes=int_setting("STORE_MAX_MB", 1024) * 1024 * 1024,
                       results_max_bytes=int_setting("STORE_RESULTS_MAX_KB", 2048) * 1024,
                       ttl_s=int_setting("STORE_TTL_DAYS", 90) * 86400)


def _private_key() -> str:
    path = env_value("GITHUB_PRIVATE_KEY_PATH")
    if path is not None:
        try:
            key = Path(path).read_text()
        except OSError as e:
            raise SettingsError(f"GITHUB_PRIVATE_KEY_PATH: cannot read {path}: "
                                f"{e.strerror}") from None
        name = "GITHUB_PRIVATE_KEY_PATH"
    else:
        # A key pasted into an env file often has literal "\n" for its line breaks.
        key = required("GITHUB_PRIVATE_KEY").replace("\\n", "\n")
        name = "GITHUB_PRIVATE_KEY"
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        load_pem_private_key(key.encode(), password=None)
    except (ValueError, TypeError) as e:
        raise SettingsError(f"{name} is not a PEM private key ({str(e).splitlines()[0]})") \
            from None
    return key


def load_app_settings() -> AppSettings:
    app_id = required("GITHUB_APP_ID")
    if not app_id.isdigit():
        raise SettingsError(f"GITHUB_APP_ID is not a number: {app_id!r}")
    auto = env_value("VERIFY_MODEL_TYPES")
    dashboard = env_value("DASHBOARD_URL")
    load_store_limits()  # a bad STORE_* value stops start-up too
    return AppSettings(
        redis_url=redis_url(),
        app_id=int(app_id),
        private_key=_private_key(),
        webhook_secret=secret("GITHUB_WEBHOOK_SECRET", WEBHOOK_SECRET_MIN_CHARS),
        api_url=url_setting("GITHUB_API_URL", "https://api.github.com", ("https", "http")),
        git_url=url_setting("GITHUB_GIT_URL", "https://github.com", ("https", "http", "file")),
        dashboard_url=url_setting("DASHBOARD_URL", None, ("https", "http")) if dashboard else None,
        auto_model_types=tuple(t.strip() for t in auto.split(",") if t.strip()) if auto else None,
        max_model_types=int_setting("VERIFY_MAX_MODEL_TYPES", 24),
        auto_checks=tuple(c.strip() for c in (env_value("VERIFY_CHECKS") or "").split(",")
                          if c.strip()),
        baseline=flag_setting("VERIFY_BASELINE", True),
    )
