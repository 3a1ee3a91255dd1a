"""Service configuration: one `Settings` object read from `TWOTOWER_*` environment variables.

Built once per app by `service.app.create_app()` (never at import time), so tests and embedders pass their
own; `python -m service serve` / `load-features` build it from flags and the environment.

| variable                     | default     | meaning                                                        |
|------------------------------|-------------|----------------------------------------------------------------|
| TWOTOWER_ARTIFACTS           | artifacts   | artifacts root (models/, indexes/, ACTIVE_INDEX)               |
| TWOTOWER_DATA_DIR            | data        | where the embedded Redis persists (data/redis/)                |
| TWOTOWER_REDIS_URL           | (unset)     | external Redis (redis://, rediss://, unix://); unset: embedded |
| TWOTOWER_REDIS_PREFIX        | twotower:   | prefix of every Redis key and channel                          |
| TWOTOWER_REDIS_TIMEOUT       | 0.5         | seconds before a Redis call counts as failed                   |
| TWOTOWER_ADMIN_TOKEN         | (unset)     | bearer token of /v1/admin/*; unset: admin API disabled (404)   |
| TWOTOWER_MAX_K               | 1000        | largest k a request may ask for                                |
| TWOTOWER_MAX_HISTORY         | 200         | longest request history; stored histories are capped to it    |
| TWOTOWER_MAX_SEEN            | 2000        | seen items kept per user (exclude_seen); older ones may return |
| TWOTOWER_EVENT_LOG_MAX       | 10000000    | events the log (Redis Stream) keeps before trimming the oldest |
| TWOTOWER_MAX_EXCLUDE         | 1000        | most ids in a request's `exclude`                              |
| TWOTOWER_MAX_BATCH           | 64          | most requests in one batch call                                |
| TWOTOWER_MAX_EVENTS          | 1000        | most events in one /v1/events call                             |
| TWOTOWER_MAX_BODY_BYTES      | 1048576     | largest request body (413 beyond)                              |
| TWOTOWER_POLL_SECONDS        | 2.0         | ACTIVE_INDEX poll period (fallback to pub/sub); 0 disables     |
| TWOTOWER_THREADS             | 1           | torch/FAISS threads per process (concurrency comes from requests) |
| TWOTOWER_BATCH_MAX           | 32          | most concurrent recommendation requests served as one batch; 1: none |
| TWOTOWER_BATCH_WAIT_MS       | 0           | extra wait (ms) for a batch to fill; 0: batch only what is queued |
| TWOTOWER_USER_TOWER          | numpy       | user tower at serving: numpy copy of the weights, or torch module |
| TWOTOWER_USER_CACHE_SECONDS  | 30          | per-process user cache (invalidated on writes) expiry; 0: off  |
| TWOTOWER_USER_CACHE_SIZE     | 10000       | most users cached per process (~25 KiB each at 200 items)      |
| TWOTOWER_ANSWER_CACHE_SIZE   | 10000       | stored user records whose vector and top-k a pair remembers; 0: off |
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.redis_keys import DEFAULT_EVENT_LOG_MAX, DEFAULT_MAX_SEEN, DEFAULT_PREFIX

MIN_ADMIN_TOKEN_LENGTH = 16


class Settings(BaseSettings):
    """Typed service settings; validators refuse values that would be unsafe or could never work."""

    model_config = SettingsConfigDict(env_prefix="TWOTOWER_", extra="ignore", frozen=True)

    artifacts: Path = Field(default=Path("artifacts"), description="artifacts root (models/, indexes/, ACTIVE_INDEX)")
    data_dir: Path = Field(default=Path("data"), description="embedded Redis persists under <data_dir>/redis")
    redis_url: str | None = Field(default=None, description="external Redis URL; unset = embedded Redis")
    redis_prefix: str = Field(
        default=DEFAULT_PREFIX, max_length=64, description="prefix of every Redis key and channel"
    )
    redis_timeout: float = Field(default=0.5, gt=0, le=30, description="seconds before a Redis call counts as failed")
    admin_token: SecretStr | None = Field(default=None, description="bearer token for /v1/admin/*; unset disables it")
    max_k: int = Field(default=1000, ge=1, le=100_000)
    max_history: int = Field(default=200, ge=1, le=100_000)
    max_seen: int = Field(default=DEFAULT_MAX_SEEN, ge=1, le=1_000_000, description="seen items kept per user")
    event_log_max: int = Field(
        default=DEFAULT_EVENT_LOG_MAX, ge=1000, description="events the log keeps unexported before the oldest go"
    )
    max_exclude: int = Field(default=1000, ge=0, le=1_000_000)
    max_batch: int = Field(default=64, ge=1, le=10_000)
    max_events: int = Field(default=1000, ge=1, le=1_000_000)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    poll_seconds: float = Field(default=2.0, ge=0, description="ACTIVE_INDEX poll period; 0 disables polling")
    threads: int = Field(default=1, ge=1, le=256, description="torch and FAISS threads")
    batch_max: int = Field(default=32, ge=1, le=1024, description="micro-batch size limit; 1 disables batching")
    batch_wait_ms: float = Field(default=0.0, ge=0, le=100, description="wait for a micro-batch to fill (ms)")
    user_tower: Literal["numpy", "torch"] = Field(default="numpy", description="serving user tower")
    user_cache_seconds: float = Field(
        default=30.0, ge=0, le=86_400, description="user cache expiry (s), a backstop to invalidation; 0 disables"
    )
    user_cache_size: int = Field(default=10_000, ge=0, le=100_000_000, description="most users cached per process")
    answer_cache_size: int = Field(
        default=10_000, ge=0, le=100_000_000, description="stored user records whose answers a pair remembers"
    )

    @field_validator("redis_url", "admin_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # Compose files often pass `VAR=${VAR:-}`: an empty string means "not configured", not "empty token".
        return None if isinstance(value, str) and value.strip() == "" else value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in {"redis", "rediss", "unix"}:
            raise ValueError(f"TWOTOWER_REDIS_URL must start with redis://, rediss:// or unix://, got {value!r}")
        return value

    @field_validator("admin_token")
    @classmethod
    def _strong_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_ADMIN_TOKEN_LENGTH:
            raise ValueError(
                f"TWOTOWER_ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN_LENGTH} characters; generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`, or leave it unset to disable admin"
            )
        return value

    @property
    def admin_enabled(self) -> bool:
        return self.admin_token is not None
