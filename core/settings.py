"""Process settings, read from the environment (prefix GENROUTE_) when a process starts.

Nothing here runs at import: `Settings()` is built by the CLI, the API's lifespan or the
worker's startup and passed down.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENROUTE_", extra="ignore")

    # where state lives
    data_dir: Path = Path(".genroute")
    database_url: str = ""  # default: sqlite+aiosqlite:///{data_dir}/genroute.db
    db_pool_size: int = 30  # PostgreSQL connections kept per process
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "genroute"  # namespaces queues and channels, so stacks can share a Redis
    catalog: Path | None = None  # default: the catalog shipped in core/routing/catalog.yaml

    # blob storage
    storage: Literal["local", "s3"] = "local"
    storage_dir: Path | None = None  # default: {data_dir}/blobs
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = None  # host clients use to download, if it differs
    s3_region: str = "us-east-1"
    s3_bucket: str = "genroute"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_create_bucket: bool = False
    s3_multipart_threshold_bytes: int = 8 * 1024 * 1024
    url_ttl_seconds: int = 3600  # lifetime of presigned / signed download URLs

    # api
    admin_key: str = ""  # a bearer key for /v1/admin/... (tenants, keys, catalog) besides `keys create --admin` keys
    public_url: str = "http://127.0.0.1:8000"  # base of signed local file URLs
    secret_key: str = ""  # HMAC key for local file URLs; dev mode makes one in data_dir
    max_body_bytes: int = 8 * 1024 * 1024
    max_wait_seconds: int = 60
    key_cache_seconds: float = 5.0  # backstop only: key changes are announced on Redis and drop caches at once
    # failed authentication (api/deps.py, core/limits/auth.py)
    auth_negative_cache_seconds: float = 2.0  # an unknown key's hash is remembered this long per process (0: never)
    auth_failure_limit: int = 100  # failed authentications per client address per window, across replicas; then 429 (0: no limit)
    auth_failure_window_seconds: float = 60.0
    # browser origins allowed to call the API directly, e.g. ["https://app.example.com"]; "*" for any
    cors_origins: Annotated[list[str], NoDecode] = []  # JSON or comma-separated

    # logs (core/logs.py): json by default for `genroute api` and `worker`, text for `dev`
    log_format: Literal["json", "text"] | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "debug", "info", "warning", "error", "critical"] = "INFO"

    # worker
    worker_max_jobs: int = 50
    worker_poll_delay: float = 0.05  # ARQ's pickup latency; its default 0.5 s is too slow
    task_timeout_seconds: int = 120
    reconcile_every_seconds: int = 10
    metrics_refresh_seconds: float = Field(default=1.0, gt=0)  # Redis-held gauges of /metrics are at most this old
    reconcile_grace_seconds: float = 30.0  # how stale a queued/running job must be
    max_output_bytes: int = 2 * 1024 * 1024 * 1024
    # storing outputs: a download stalls after the deployment's `timeouts.download` without a
    # byte; one that keeps flowing runs up to this ceiling (or the job's deadline, if later)
    store_max_seconds: int = 3600
    store_download_tries: int = 4  # attempts per output URL (resumed with Range) before storage_error
    max_image_pixels: int = 64_000_000  # Pillow decompression-bomb guard
    deadline_image_seconds: int = 600
    deadline_audio_seconds: int = 900
    deadline_video_seconds: int = 3600
    deadline_text_seconds: int = 600
    http_timeout_seconds: float = 60.0
    poll_error_limit: int = 5  # consecutive failed polls before a job fails
    # the poll schedule (core/jobs/polls.py, workers/poll.py)
    poll_concurrency: int = 500  # polls one worker runs at once (they wait on the network, not the CPU)
    poll_claim_seconds: float = 20.0  # a claimed poll whose worker died is due again after this
    poll_max_interval_seconds: float = 60.0  # never longer between polls (the slot lease is renewed then)
    progress_write_seconds: float = 120.0  # a polled job's row gets its progress at most this often
    submit_marker_seconds: float = 15.0  # a create call in flight is marked this long, renewed while it runs

    # events, websockets/SSE, webhooks (core/events.py, api/events.py, core/webhooks.py)
    event_stream_maxlen: int = 1000  # events kept per job stream (approximate trim)
    event_retention_seconds: int = 86400  # a job's stream expires this long after its last event
    ws_queue_size: int = 256  # events buffered per websocket/SSE client; past it the client is cut off (4408)
    ws_send_timeout_seconds: float = 10.0  # a send blocked this long also counts as a slow client
    ws_ping_seconds: float = 20.0
    ws_recheck_seconds: float = 5.0  # an idle subscriber re-reads the job's stream this often
    ws_max_per_key: int = 100  # websockets one key may hold open at once, across replicas; the next closes 4409 (0: no cap)
    webhook_timeout_seconds: float = 10.0
    # retry delays after each failed attempt; the default reaches ~23.7 h, then `exhausted`
    webhook_backoff_seconds: Annotated[list[float], NoDecode] = [5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 28800]
    webhook_max_response_bytes: int = 16384  # read (and keep a snippet of) at most this much
    webhook_allowlist: Annotated[list[str], NoDecode] = []  # deprecated: joined to outbound_allowlist (which see)
    webhook_secret_rotation_seconds: int = 86400  # the previous secret keeps signing this long
    # keys that encrypt tenants' signing secrets at rest (core/secretbox.py), newest first: the first
    # encrypts, every one decrypts; empty: GENROUTE_SECRET_KEY encrypts (it always decrypts too)
    webhook_encryption_keys: Annotated[list[str], NoDecode] = []
    webhook_endpoint_cache_seconds: float = 5.0  # how soon a new tenant endpoint is seen by every process
    submit_attempts: int = 4  # tries of a create the provider refused with 429/5xx or never received
    submit_backoff_seconds: float = 1.0  # first retry delay; doubles, with jitter, up to 60 s

    # outbound fetches of URLs tenants and providers hand us (core/netguard.py, core/fetcher.py)
    outbound_allowlist: Annotated[list[str], NoDecode] = []  # CIDRs admitted although not global, e.g. ["127.0.0.1/32"] in development
    outbound_resolve_timeout_seconds: float = 3.0  # a DNS answer slower than this refuses the URL

    # issue 14: the result cache (core/cache.py), deadlines and batches (workers/deadlines.py, workers/batches.py)
    cache_ttl_seconds: int = 86400  # how old a succeeded job may be and still answer an identical seeded request
    deadline_scan_limit: int = 1000  # jobs past their Cancel-After / start-by deadline ended per scan
    max_batch_items: int = 1000
    replicate_page_size: int = 100  # predictions per page of GET /replicate/v1/predictions (Replicate's is 100)

    # routing: limits and health shared in Redis (core/routing/router.py, core/limits/deployments.py)
    router_backoff_cap_seconds: float = 60.0  # longest jittered delay between attempts
    router_max_retry_after_seconds: float = 300.0  # a provider's Retry-After is honoured up to this
    router_cooldown_failures: int = 3  # consecutive counted failures that open a deployment's breaker
    router_cooldown_seconds: float = 30.0  # how long an opened breaker keeps the deployment out
    router_failure_window_seconds: float = 60.0  # failures further apart than this do not add up
    router_lease_seconds: float = 300.0  # a concurrency slot frees itself this long after its last renewal

    @field_validator("webhook_backoff_seconds", "webhook_allowlist", "outbound_allowlist", "cors_origins",
                     "webhook_encryption_keys", mode="before")
    @classmethod
    def _list(cls, v: Any) -> Any:
        """Lists come from the environment as JSON (`["127.0.0.1/32"]`); a string given in
        code may also be JSON or comma-separated."""
        if isinstance(v, str):
            return json.loads(v) if v.strip().startswith("[") else [x.strip() for x in v.split(",") if x.strip()]
        return v

    @field_validator("catalog", mode="before")
    @classmethod
    def _unset_when_empty(cls, v: Any) -> Any:
        """`GENROUTE_CATALOG=` (a compose file's `${GENROUTE_CATALOG:-}`) means the default."""
        return None if isinstance(v, str) and not v.strip() else v

    def outbound_networks(self) -> list[str]:
        """Every CIDR the outbound guard admits: outbound_allowlist and the older webhook_allowlist."""
        return [*self.outbound_allowlist, *self.webhook_allowlist]

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir}/genroute.db"

    def resolved_storage_dir(self) -> Path:
        return self.storage_dir or self.data_dir / "blobs"

    def deadline_seconds(self, modality: str) -> int:
        return int(getattr(self, f"deadline_{modality}_seconds", self.deadline_image_seconds))

    def queue_for(self, modality: str) -> str:
        """The queue of a job's stores and cancels, by modality."""
        return queue_name(self.redis_prefix, "video" if modality == "video" else "media")

    def run_queue(self, lane: str) -> str:
        """The queue of a job's runs: its lane (core.routing.catalog.Catalog.lane) is its
        modality, or "sync" for models whose creates are long synchronous calls."""
        return queue_name(self.redis_prefix, "sync") if lane == "sync" else self.queue_for(lane)

    @property
    def queues(self) -> list[str]:
        return [queue_name(self.redis_prefix, q) for q in QUEUES]

    def job_channel(self, job_id: str) -> str:
        return f"{self.redis_prefix}:job:{job_id}"


# slow video never starves images, audio or webhooks; long synchronous creates ("sync":
# a minute or more inside one HTTP call) never take the slots of short runs
QUEUES = ("media", "video", "sync", "webhooks")


def queue_name(prefix: str, queue: str) -> str:
    return f"{prefix}:queue:{queue}"
