"""Configuration: one YAML file plus ``PGMETER_*`` environment overrides.

The file follows OpenMeter's config shape where the two overlap (``namespace``,
``meters``), so an OpenMeter meter list can be pasted in unchanged. Every
connection setting can be overridden from the environment, which is how the Helm
chart injects secrets: ``PGMETER_POSTGRES_URL`` sets ``postgres.url``,
``PGMETER_NATS_URL`` sets ``nats.url`` and so on (one ``_`` splits the section
from the field).
"""

from __future__ import annotations

import json
import re
import zoneinfo
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_CONFIG_FILE = "pgmeter.yaml"

_GO_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+$")
_GO_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_SECONDS = re.compile(r"^\d+(?:\.\d+)?$")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def _go_duration(value: Any) -> Any:
    """Accept OpenMeter's Go-style durations ("768h", "15m", "500ms"), ISO 8601 ("PT1H")
    and plain seconds (90, "90", "1.5") alike, from YAML and from the environment."""
    if isinstance(value, str):
        text = value.strip()
        if _GO_DURATION.match(text):
            return timedelta(seconds=sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _GO_PART.findall(text)))
        if _SECONDS.match(text):
            return timedelta(seconds=float(text))
    return value


Duration = Annotated[timedelta, BeforeValidator(_go_duration)]


class ConfigError(Exception):
    """Configuration that cannot be used. The message names the file and the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PostgresConfig(Section):
    url: str = "postgresql://postgres@127.0.0.1:5432/pgmeter"
    # Short queries from the api may go through a transaction-mode pooler; everything
    # that needs a session (COPY, advisory locks, LISTEN) uses ``url``.
    query_url: str | None = Field(default=None, alias="queryUrl")
    # A hot standby (CNPG's ``-ro`` service) for the api's read-only reads of events
    # and rollups: meter queries, subject/group-value lists, the event listing. Their
    # answers lag the primary by the standby's replay lag, reported in the
    # X-Pgmeter-Replica-Lag header of meter queries and in
    # pgmeter_query_replica_lag_seconds. Everything that writes (definitions, customers,
    # grants) and entitlement values stay on ``queryUrl``/``url``.
    read_url: str | None = Field(default=None, alias="readUrl")
    pool_size: int = Field(default=10, ge=1, alias="poolSize")
    # How long opening a connection may take, and waiting for a free one in the pool.
    # Past either, an api request answers 503 with Retry-After instead of hanging.
    connect_timeout: Duration = Field(default=timedelta(seconds=5), alias="connectTimeout")
    acquire_timeout: Duration = Field(default=timedelta(seconds=5), alias="acquireTimeout")
    # The longest statement the api runs: past it the statement is cancelled on the
    # server and the request answers 503. Meter queries take tens of milliseconds and
    # the largest allowed answer about a second; 10 s stays below the 30 s that HTTP
    # clients and Grafana give up after, so the server never works for a caller that
    # left. Background roles (sink, refresher, Lago) are not bound by it: a backfill
    # may legitimately run for minutes.
    statement_timeout: Duration = Field(default=timedelta(seconds=10), alias="statementTimeout")


class NatsConfig(Section):
    url: str = "nats://127.0.0.1:4222"
    stream: str = "PGMETER_EVENTS"
    # Events of namespace N travel on subject ``<subject_prefix>.N``.
    subject_prefix: str = Field(default="pgmeter.events", alias="subjectPrefix")
    consumer: str = "pgmeter-sink"
    # JetStream replicas for the stream (3 on a production NATS cluster).
    replicas: int = Field(default=1, ge=1, le=5)
    # How long the broker keeps acknowledged-but-unsunk data. Counted from storage
    # time, never from CloudEvent time, so late events are never expired unread.
    max_age: Duration = Field(default=timedelta(days=7), alias="maxAge")
    # How long a message delivered to a sink may stay unacknowledged before JetStream
    # hands it to another sink. A live sink extends it for every message it holds
    # (in-progress acks every third of it, also while it waits for Postgres), so this
    # only bounds how long a crashed sink's messages stay hidden: failover time.
    ack_wait: Duration = Field(default=timedelta(seconds=5), gt=timedelta(0), alias="ackWait")
    # Credentials, at most one kind: user + password, a token, or a creds file
    # (NKey seed + user JWT, as `nsc` writes it). They come from the environment
    # (PGMETER_NATS_USER, _PASSWORD, _TOKEN, _CREDS_FILE), which the chart fills from a
    # Secret; repr=False keeps them out of logs and error messages.
    user: str | None = None
    password: str | None = Field(default=None, repr=False)
    token: str | None = Field(default=None, repr=False)
    creds_file: str | None = Field(default=None, alias="credsFile")

    @model_validator(mode="after")
    def _one_kind_of_credentials(self) -> NatsConfig:
        if bool(self.user) != bool(self.password):
            raise ValueError("nats.user and nats.password go together")
        kinds = [name for name, used in (("user/password", self.user), ("token", self.token),
                                         ("credsFile", self.creds_file)) if used]
        if len(kinds) > 1:
            raise ValueError(f"nats: use one kind of credentials, not {' and '.join(kinds)}")
        return self

    def credentials(self) -> dict[str, str]:
        """Keyword arguments for ``nats.connect`` (nats-py names)."""
        if self.user and self.password:
            return {"user": self.user, "password": self.password}
        if self.token:
            return {"token": self.token}
        if self.creds_file:
            return {"user_credentials": self.creds_file}
        return {}


class ValkeyConfig(Section):
    url: str | None = None
    password: str | None = None
    # A Valkey cluster: ``url`` names any one node; the client finds the others and follows
    # slot moves. Every command pgmeter sends touches one key (docs/quota.md).
    cluster: bool = False
    key_prefix: str = Field(default="pgmeter:", alias="keyPrefix")
    # A cache that answers slower than this is skipped, not waited for.
    timeout: float = Field(default=0.05, gt=0)
    # Windows that ended longer ago than this are "settled" and served from the cache.
    # The sink and the api must agree on it: set it once for all roles.
    settle_after: Duration = Field(default=timedelta(hours=1), alias="settleAfter")
    ttl: Duration = Field(default=timedelta(hours=24))

    @property
    def late_margin(self) -> timedelta:
        """Events older than this when the sink commits them bump the cache epoch.

        Half the settle horizon: the other half covers sink transactions that began
        before a query read the epoch and commit after it (see pgmeter.query.cache).
        """
        return self.settle_after / 2


class QuotaConfig(Section):
    """Quota balances in Valkey (pgmeter.quota); on whenever valkey.url is set and the
    process runs the sink. docs: docs/quota.md."""

    enabled: bool = True
    # Every metered entitlement is recomputed this often even without a reason (lost
    # notices, a Valkey that lost its data without anyone noticing).
    rebuild_interval: Duration = Field(default=timedelta(minutes=5), gt=timedelta(0), alias="rebuildInterval")
    # How many entitlements are recomputed at once.
    concurrency: int = Field(default=4, ge=1, le=64)


def _svix_schedule() -> list[timedelta]:
    return [timedelta(0), timedelta(seconds=5), timedelta(minutes=5), timedelta(minutes=30), timedelta(hours=2),
            timedelta(hours=5), timedelta(hours=10), timedelta(hours=10)]


class NotificationsConfig(Section):
    """Notification webhooks (pgmeter.notify), delivered from a Postgres outbox by the
    process that runs the sink. docs: docs/quota.md."""

    # Delay before each attempt (the first usually 0): Svix's schedule by default. After
    # the last, the delivery is FAILED (POST .../events/{id}/resend starts it again).
    retry_schedule: list[Duration] = Field(default_factory=_svix_schedule, alias="retrySchedule",
                                           min_length=1, max_length=20)
    # A receiver must answer 2xx within this (Svix: about 15 s).
    timeout: Duration = Field(default=timedelta(seconds=15), gt=timedelta(0))
    max_channels: int = Field(default=100, ge=1, alias="maxChannels")
    max_rules: int = Field(default=100, ge=1, alias="maxRules")


class IngestConfig(Section):
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, alias="maxBodyBytes")
    # Group commit: how long the api waits to gather events from concurrent requests
    # into one JetStream message, and the most events one message may carry.
    linger: Duration = Field(default=timedelta(milliseconds=2))
    max_batch_events: int = Field(default=2000, ge=1, alias="maxBatchEvents")


class SinkConfig(Section):
    fetch_batch: int = Field(default=200, ge=1, alias="fetchBatch")
    max_events_per_tx: int = Field(default=20000, ge=1, alias="maxEventsPerTx")
    partition_days_ahead: int = Field(default=7, ge=0, alias="partitionDaysAhead")
    # Raw events older than this are dropped by partition; 0 keeps them forever.
    retention_days: int = Field(default=0, ge=0, alias="retentionDays")


class RefresherConfig(Section):
    interval: Duration = timedelta(seconds=2)
    max_batch: int = Field(default=200_000, ge=1, alias="maxBatch")
    # Zones whose local days every meter keeps a rollup level of, so DAY and MONTH
    # queries there read one row per day and key (docs/scaling.md). Each zone adds
    # to every merge; a zone not listed is still answered exactly, from hours (or
    # quarter hours for :30/:45 zones).
    day_zones: list[str] = Field(
        default_factory=lambda: ["America/New_York", "Asia/Kolkata", "Europe/Berlin", "Europe/London"],
        alias="dayZones", max_length=16)

    @field_validator("day_zones")
    @classmethod
    def _known_zones(cls, value: list[str]) -> list[str]:
        for name in value:
            try:
                zoneinfo.ZoneInfo(name)
            except (ValueError, zoneinfo.ZoneInfoNotFoundError):
                raise ValueError(f"unknown time zone {name!r} (an IANA name such as Europe/Berlin)") from None
        return value


class LimitsConfig(Section):
    """What one tenant may send or ask for; each limit is refused with 400 problem+json
    (409 for the meter quota; an answer over the cache entry size is served, not cached).

    docs/limits.md lists every limit with its default, its setting and its error.
    """

    # Byte lengths of the CloudEvent fields that are stored in indexed columns.
    event_id_bytes: int = Field(default=256, ge=16, le=1024, alias="eventIdBytes")
    event_source_bytes: int = Field(default=512, ge=16, le=1024, alias="eventSourceBytes")
    event_type_bytes: int = Field(default=256, ge=16, le=1024, alias="eventTypeBytes")
    event_subject_bytes: int = Field(default=256, ge=16, le=1024, alias="eventSubjectBytes")
    # Event times are accepted from this long before the moment of ingest (a year of
    # backfill fits) to this long after it; sink.retentionDays narrows the past.
    event_max_age: Duration = Field(default=timedelta(days=400), alias="eventMaxAge")
    event_max_ahead: Duration = Field(default=timedelta(days=1), alias="eventMaxAhead")
    # Meters: how many one namespace may have, and how big a definition may be.
    meters_per_namespace: int = Field(default=100, ge=1, alias="metersPerNamespace")
    meter_group_by_keys: int = Field(default=20, ge=1, le=30, alias="meterGroupByKeys")
    # JSONPaths (valueProperty, groupBy) in bytes and steps; the caps are what
    # pgmeter.meters.jsonpath ever hands to the parser.
    json_path_bytes: int = Field(default=256, ge=16, le=4096, alias="jsonPathBytes")
    json_path_depth: int = Field(default=16, ge=1, le=64, alias="jsonPathDepth")
    # Query answers: at most this many rows (a 400 asks to narrow the range or coarsen
    # the window), and cached only when the rendered answer is at most this big.
    query_max_rows: int = Field(default=100_000, ge=1, alias="queryMaxRows")
    cache_max_entry_bytes: int = Field(default=1024 * 1024, ge=1024, alias="cacheMaxEntryBytes")


class ServerConfig(Section):
    """The HTTP server's defences against slow or idle clients (every role's listener)."""

    # A connection must deliver a request's complete headers this long after it opened
    # (or after the first byte of a kept-alive connection's next request); otherwise it
    # is closed with 408.
    header_timeout: Duration = Field(default=timedelta(seconds=10), alias="headerTimeout")
    # A request's whole body must arrive this long after its headers; otherwise 408.
    body_timeout: Duration = Field(default=timedelta(seconds=30), alias="bodyTimeout")
    # An idle keep-alive connection is closed after this long without a new request.
    keep_alive: Duration = Field(default=timedelta(seconds=5), alias="keepAlive")
    # Connections plus requests in progress; beyond it new requests get 503. With
    # ingest.maxBodyBytes it bounds the memory held by request bodies.
    limit_concurrency: int = Field(default=1000, ge=1, alias="limitConcurrency")


class MetricsConfig(Section):
    # Label Prometheus series with namespace and meter slug values. Off by default:
    # /metrics needs no token, and tenant names, slugs and volumes are not public.
    # Turn it on for single-tenant installs; when off the labels stay, with "" values.
    tenant_labels: bool = Field(default=False, alias="tenantLabels")


class LagoMapping(Section):
    meter: str
    code: str
    property: str = "value"


def lago_base_url(value: Any) -> Any:
    """``http://lago:3000``, ``http://lago:3000/`` and ``http://lago:3000/api/v1`` all
    name the same API: the client adds ``/api/v1/...`` itself."""
    if isinstance(value, str):
        value = value.strip().rstrip("/")
        if value.endswith("/api/v1"):
            value = value[: -len("/api/v1")].rstrip("/")
    return value


class LagoCredits(Section):
    """Prepaid credits of a Lago wallet that become grants on a feature's entitlement."""

    feature: str
    # Credits one unit of the feature costs: a settled top-up of C credits grants C / rate.
    credits_per_unit: Decimal = Field(alias="creditsPerUnit", gt=0)
    # Only this wallet (its code); None: any wallet of the customer.
    wallet_code: str | None = Field(default=None, alias="walletCode")


class LagoWebhooksConfig(Section):
    """The receiver of Lago's webhooks (pgmeter.credits.webhooks, POST /lago/webhooks).

    Off until a key is set. ``publicKey``: Lago's RSA public key (PEM, or base64 PEM as
    GET /api/v1/webhooks/public_key serves it) for the default ``jwt`` signatures;
    ``hmacKey``: the organisation's HMAC Signature Token (not the API key).
    """

    public_key: str | None = Field(default=None, alias="publicKey")
    hmac_key: str | None = Field(default=None, alias="hmacKey")
    # The JWT's ``iss`` (Lago's LAGO_API_URL); None: not checked.
    issuer: str | None = None
    # The namespace whose customers (by key = Lago external_customer_id) get the grants.
    namespace: str = "default"
    credits: list[LagoCredits] = Field(default_factory=list)
    max_body_bytes: int = Field(default=256 * 1024, ge=1024, alias="maxBodyBytes")

    @property
    def enabled(self) -> bool:
        return bool(self.public_key or self.hmac_key)


class LagoConfig(Section):
    """The Lago hand-off (pgmeter.lago). docs: the README's Lago section."""

    enabled: bool = False
    url: Annotated[str, BeforeValidator(lago_base_url)] = "http://lago-api-svc.lago.svc:3000"
    api_key: str | None = Field(default=None, alias="apiKey")
    # How often usage is pushed, running totals of open windows included. Lago
    # invoices at hh:10 after a period ends (final at once with its default grace
    # period of 0), so interval + grace must stay well under 10 minutes unless the
    # Lago side has an invoice grace period; `lago-sync --status` checks it.
    interval: Duration = Field(default=timedelta(minutes=1), gt=timedelta(0))
    # Usage is read up to now - grace: 0 sends everything acknowledged so far; an
    # hourly set-up (interval 1h, grace 15m) sends each window about once, complete.
    grace: Duration = Field(default=timedelta(0), ge=timedelta(0))
    # One Lago event per window (and subscription, in the customer's time zone).
    window: Literal["HOUR", "DAY"] = "HOUR"
    # Events per POST /api/v1/events/batch (Lago's LAGO_EVENTS_BATCH_MAX_LENGTH).
    batch_size: int = Field(default=100, ge=1, le=10_000, alias="batchSize")
    mappings: list[LagoMapping] = Field(default_factory=list)
    # subject -> external_subscription_id; subjects not listed map to themselves.
    subjects: dict[str, str] = Field(default_factory=dict)
    webhooks: LagoWebhooksConfig = Field(default_factory=LagoWebhooksConfig)

    @model_validator(mode="after")
    def _usable_when_enabled(self) -> LagoConfig:
        if self.enabled and not self.mappings:
            raise ValueError("lago.enabled needs at least one entry in lago.mappings")
        codes = [(m.meter, m.code) for m in self.mappings]
        if len(codes) != len(set(codes)):
            raise ValueError("lago.mappings has the same meter and code twice")
        return self


class PortalConfig(Section):
    """OpenMeter's consumer portal: subject-scoped tokens a TPP's own UI can query with."""

    # HS256 key the portal tokens are signed with. Unset: the portal routes answer
    # 501 (``pgmeter dev`` makes a random one per run). In Kubernetes it comes from a
    # Secret as PGMETER_PORTAL_TOKEN_SECRET, never from a plain value.
    token_secret: str | None = Field(default=None, alias="tokenSecret", repr=False, min_length=32)
    # A token's lifetime when the request gives no expiresAt (OpenMeter: 1h).
    token_expiration: Duration = Field(default=timedelta(hours=1), alias="tokenExpiration")
    # Origins whose browsers may call the portal query route (CORS); empty: none.
    cors_allowed_origins: list[str] = Field(default_factory=list, alias="corsAllowedOrigins")


class Settings(BaseSettings):
    """All of pgmeter's settings. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="PGMETER_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="forbid",
        populate_by_name=True,
    )

    address: str = "127.0.0.1:8888"
    namespace: str = "default"
    log_level: str = Field(default="info", alias="logLevel",
                           validation_alias=AliasChoices("logLevel", "log_level"))
    postgres: PostgresConfig = Field(default_factory=PostgresConfig)
    nats: NatsConfig = Field(default_factory=NatsConfig)
    valkey: ValkeyConfig = Field(default_factory=ValkeyConfig)
    quota: QuotaConfig = Field(default_factory=QuotaConfig)
    notifications: NotificationsConfig = Field(default_factory=NotificationsConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    sink: SinkConfig = Field(default_factory=SinkConfig)
    refresher: RefresherConfig = Field(default_factory=RefresherConfig)
    lago: LagoConfig = Field(default_factory=LagoConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    portal: PortalConfig = Field(default_factory=PortalConfig)
    # Bearer token -> namespace. Empty means auth is off.
    auth_tokens: dict[str, str] = Field(default_factory=dict, alias="authTokens",
                                        validation_alias=AliasChoices("authTokens", "auth_tokens"))
    # OpenMeter meter definitions as written. This module knows no domain: the meters
    # package validates them (pgmeter.meters.service.config_meters), with the same
    # rules and limits as the API, when the CLI loads the file and when a process starts.
    meters: list[dict[str, Any]] = Field(default_factory=list)
    # Where the settings came from, for error messages: the file, or "environment".
    _source: str = PrivateAttr(default="environment")

    @field_validator("address")
    @classmethod
    def _address_has_port(cls, value: str) -> str:
        return _check_host_port(value, "127.0.0.1:8888")

    @field_validator("namespace")
    @classmethod
    def _namespace_is_subject_token(cls, value: str) -> str:
        return _check_namespace(value)

    @field_validator("auth_tokens")
    @classmethod
    def _token_namespaces(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_tokens(value)

    @property
    def source(self) -> str:
        """Where these settings came from, as error messages name it."""
        return f"{self._source} (or PGMETER_* environment)"

    @property
    def listen_host(self) -> str:
        return self.address.rpartition(":")[0] or "0.0.0.0"

    @property
    def listen_port(self) -> int:
        return int(self.address.rpartition(":")[2])

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over the file (passed as init kwargs).
        return env_settings, init_settings


NAMESPACE_MAX_LENGTH = 64


def is_namespace(value: str) -> bool:
    """1 to 64 ASCII letters, digits, '-' or '_': a namespace becomes a NATS subject token
    and a SQL value (the sink applies the same rule to the subjects it reads)."""
    return 0 < len(value) <= NAMESPACE_MAX_LENGTH and all(c.isascii() and (c.isalnum() or c in "-_")
                                                          for c in value)


def _check_namespace(value: str) -> str:
    if not is_namespace(value):
        raise ValueError(f"namespace {value!r} must be 1 to {NAMESPACE_MAX_LENGTH} letters, digits, '-' or '_'")
    return value


def _check_host_port(value: str, example: str) -> str:
    _, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be host:port, e.g. {example}")
    return value


def _check_tokens(value: dict[str, str]) -> dict[str, str]:
    """``authTokens``, the api's and the collector's: token -> namespace."""
    for token, namespace in value.items():
        if len(token) < 16:
            raise ValueError("tokens must be at least 16 characters")
        _check_namespace(namespace)
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return loaded


def invalid(source: str, exc: ValidationError, at: tuple[str | int, ...] = ()) -> ConfigError:
    """One line naming ``source`` and every field ``exc`` found wrong; ``at`` is where
    in the file the validated part sits (``("meters", 0)``)."""
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in (*at, *error["loc"])) or "(top level)"
        problems.append(f"{field}: {error['msg']}")
    return ConfigError(f"{source}: invalid configuration: " + "; ".join(problems))


def load_settings(path: str | Path | None = None, *, required: bool = False) -> Settings:
    """Load settings from ``path`` (default ``pgmeter.yaml`` if it exists) and the env.

    Raises :class:`ConfigError` with a one-line message naming the file and field.
    """
    file = Path(path) if path is not None else Path(DEFAULT_CONFIG_FILE)
    data: dict[str, Any] = {}
    if file.exists():
        data = _read_yaml(file)
    elif required or path is not None:
        raise ConfigError(f"{file}: config file not found")
    source = str(file) if file.exists() else "environment"
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise invalid(f"{source} (or PGMETER_* environment)", exc) from exc
    except (ValueError, json.JSONDecodeError) as exc:  # malformed JSON in a PGMETER_ variable
        raise ConfigError(f"{source} (or PGMETER_* environment): {exc}") from exc
    settings._source = source
    return settings


# -- pgmeter collect ---------------------------------------------------------------
# The collector's own file (collector.yaml): it needs no Postgres, NATS or Valkey of
# its own, so it is a separate model rather than a section of Settings. Field names
# follow the rest of the file (camelCase aliases).


class DeliveryConfig(Section):
    """Where a pipeline delivers: any OpenMeter-compatible ``POST /api/v1/events``."""

    url: str
    # The bearer token, or the name of an environment variable holding it; with neither,
    # PGMETER_COLLECT_TOKEN (the chart passes its Secret that way: no token in the file).
    token: str | None = None
    token_env: str | None = Field(default=None, alias="tokenEnv")
    batch_size: int = Field(default=500, ge=1, le=10_000, alias="batchSize")
    # Under the api's ingest.maxBodyBytes (1 MiB by default).
    batch_bytes: int = Field(default=512 * 1024, ge=1024, alias="batchBytes")
    linger: Duration = Field(default=timedelta(milliseconds=100))
    backoff_initial: Duration = Field(default=timedelta(milliseconds=500), alias="backoffInitial")
    backoff_max: Duration = Field(default=timedelta(seconds=30), alias="backoffMax")
    timeout: Duration = Field(default=timedelta(seconds=30))
    # Batches in flight at once (each resolved by its own worker). More hides a far
    # endpoint's round trip; next to the endpoint one is fastest (bench/collect.py:
    # 12.7k / 11.9k / 11.1k events/s with 1 / 2 / 4 on the shared 2-core machine).
    max_in_flight: int = Field(default=1, ge=1, le=64, alias="maxInFlight")


class CollectSourceConfig(Section):
    """One source. ``type`` picks which of the other fields apply (docs/collect.md)."""

    type: Literal["http", "sql", "file", "prometheus", "otlp_logs", "s3", "kubernetes"]
    # http / otlp_logs: the path served on the collector's listen address.
    path: str | None = None
    # otlp_logs: also serve OTLP over gRPC (LogsService) on this host:port. Unset: HTTP only.
    grpc_listen: str | None = Field(default=None, alias="grpcListen")
    # sql: a Postgres table read incrementally by (cursor, key). s3: an S3-compatible
    # endpoint (path-style addressing); unset, AWS's own for `region`.
    url: str | None = None
    # s3: JSON-lines objects (gzip or not) under `prefix` in `bucket`, in key order.
    # Credentials: the AWS SDK's usual chain (AWS_ACCESS_KEY_ID..., a web identity).
    bucket: str | None = None
    prefix: str = ""
    region: str | None = None
    table: str | None = None
    key: str | None = None
    cursor: str | None = None
    settle: Duration | None = None  # sql: read only rows whose cursor is at least this old
    # file: a JSON-lines file followed across rotation.
    file: str | None = None
    # kubernetes: running pods' seconds at every multiple of `interval`; `url` the API
    # server (unset: in-cluster, with the pod's service account token and CA).
    namespaces: list[str] = Field(default_factory=list)  # [] = every namespace
    label_selector: str | None = Field(default=None, alias="labelSelector")
    token_file: str | None = Field(default=None, alias="tokenFile")
    ca_file: str | None = Field(default=None, alias="caFile")
    # prometheus: instant queries at every multiple of `interval`, evaluated `offset` earlier.
    queries: dict[str, str] = Field(default_factory=dict)
    offset: Duration = Field(default=timedelta(0))
    max_catch_up: int = Field(default=60, ge=1, alias="maxCatchUp")
    # sql, file, prometheus: how often to look for more.
    interval: Duration = Field(default=timedelta(seconds=5))
    batch: int = Field(default=1000, ge=1, le=100_000)


    @field_validator("grpc_listen")
    @classmethod
    def _grpc_listen_has_port(cls, value: str | None) -> str | None:
        return None if value is None else _check_host_port(value, "0.0.0.0:4317")


class PipelineConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    source: CollectSourceConfig
    # jq program: source record -> CloudEvent(s); $id is the record's deterministic id.
    mapping: str | None = None
    # The CloudEvent `source` when the mapping sets none (and part of every derived id).
    event_source: str | None = Field(default=None, alias="eventSource")
    to: DeliveryConfig
    # The buffer's bound: queued event text, in bytes.
    buffer_max_bytes: int = Field(default=1 << 30, ge=1024, alias="bufferMaxBytes")
    # With the collector's authTokens: the namespace whose tokens this pipeline's push
    # source takes (a tenant's token cannot post into another tenant's pipeline). Unset:
    # any valid token.
    namespace: str | None = None

    @field_validator("namespace")
    @classmethod
    def _namespace_is_subject_token(cls, value: str | None) -> str | None:
        return None if value is None else _check_namespace(value)


class CollectorConfig(Section):
    listen: str = "0.0.0.0:8080"
    buffer: Path = Path("./collector-buffer")
    log_level: str = Field(default="info", alias="logLevel")
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, alias="maxBodyBytes")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    # Bearer token -> namespace for the push sources (HTTP, OTLP), as the api's authTokens.
    # Empty: auth off. PGMETER_COLLECT_AUTH_TOKENS (JSON) when the file sets none.
    auth_tokens: dict[str, str] = Field(default_factory=dict, alias="authTokens")
    pipelines: list[PipelineConfig] = Field(min_length=1)

    @field_validator("auth_tokens")
    @classmethod
    def _token_namespaces(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_tokens(value)

    @field_validator("listen")
    @classmethod
    def _listen_has_port(cls, value: str) -> str:
        return _check_host_port(value, "0.0.0.0:8080")

    @model_validator(mode="after")
    def _unique(self) -> CollectorConfig:
        names = [p.name for p in self.pipelines]
        if len(set(names)) != len(names):
            raise ValueError("pipelines: names must be unique (each has its own buffer file)")
        return self


def load_collector_config(path: str | Path) -> CollectorConfig:
    """Load ``collector.yaml``; raises :class:`ConfigError` naming the file and field."""
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"{file}: config file not found")
    try:
        return CollectorConfig(**_read_yaml(file))
    except ValidationError as exc:
        raise invalid(str(file), exc) from exc
