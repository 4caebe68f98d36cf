"""Router configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.common import envs
from splitserve.router.fairness import FairShareConfig
from splitserve.router.pd_decide import PDControlConfig

PREFILL_POLICIES = ("kv_aware", "round_robin", "least_loaded")


@dataclass(frozen=True)
class RouterConfig:
    """Everything a router is built from.

    Runtime facts (the bound port, the model's context length) are returned by the
    components that discover them (RunningRouter.port, ServedModel.max_model_len).
    """

    model: str = "smollm2-135m"  # alias, HF model directory or .gguf path (as workers get it)
    host: str = "127.0.0.1"
    port: int = 0  # 0: an ephemeral port (read it back from RunningRouter.port)
    # OpenAI-compatible HTTP API and /metrics on `host`: 0 an ephemeral port (read it back
    # from RunningRouter.http_port), None not served. The CLI's default is 8000.
    http_port: int | None = 0
    # Admission: requests being served at once, and requests waiting for a slot. Past both,
    # Generate fails at once with RESOURCE_EXHAUSTED.
    max_inflight: int = 256
    max_queued: int = 256
    # Who a freed slot goes to (router.fairness): the best priority class, then, with
    # "vtc", the client with the least weighted-token service; "fcfs": the oldest. Set
    # max_inflight near the decode workers' batch capacity for the choice to matter.
    fair_share: FairShareConfig = field(default_factory=FairShareConfig)
    fair_share_sync_s: float = 0.5  # how often counters are shared through cluster state
    # Default TTFT SLO of requests that name none (GenerateRequest.ttft_slo_ms): a request
    # predicted to miss it is refused at once (router.slo). 0: no default SLO.
    ttft_slo_ms: int = 0
    prefill_policy: str = "kv_aware"  # one of PREFILL_POLICIES
    # "load": decode workers by load, local or remote prefill by the rules below, the
    # prefill worker by prefill_policy. "latency": the P/D pair (or local prefill) with the
    # best TTFT predicted from the workers' measured step times (router.latency), refusing
    # a request whose TTFT SLO the best pair would miss; "load" until step times are known.
    route_policy: str = "load"
    # Conditional disaggregation: prompts of at most this many tokens are prefilled on the
    # decode worker itself, as are prompts whose leading fraction >= local_prefix_fraction
    # the decode worker already holds in its prefix cache.
    local_prefill_threshold: int = 32
    local_prefix_fraction: float = 0.75
    block_size: int = 16  # tokens per KV block; must equal the workers' (others are skipped)
    # How long a decode worker keeps a reservation waiting for the prefill worker's KV and
    # first token (AdmitRequest.prefill_timeout_ms); also the router's deadline on Prefill.
    # 0: the decode worker's default, and no router deadline on Prefill but the request's.
    prefill_timeout_ms: int = 0
    request_timeout_s: float | None = None  # whole-request deadline; None: only the client's
    # A client whose connection takes longer than this to accept one more chunk (it stopped
    # reading: the socket and the server's buffers are full) is cut off and its request
    # cancelled, so its KV and batch slot go to others; None: wait for it forever.
    client_write_timeout_s: float | None = 10.0
    # Decode workers' outputs over one TCP connection per worker written by its engine
    # thread (router.output_channel), where the worker offers one; False: Admit streams.
    output_channels: bool = True
    # None: the router hosts an in-memory cluster store and serves it as the ClusterState
    # service on its own port (workers use RunningRouter.cluster_url). Otherwise any URL
    # cluster.open_store accepts ("redis://...", "grpc://host:port", "memory").
    cluster_url: str | None = None
    worker_refresh_s: float = 0.25  # max age of the router's snapshot of live workers
    # While the cluster store is unreachable, the router routes on its last view of the
    # workers for this long (health: "degraded"); then it answers UNAVAILABLE.
    cluster_stale_s: float = 30.0
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    # A Jinja chat template file used instead of the model's own (None: the model's).
    chat_template: str | None = None
    # max_tokens for requests that leave it unset (capped by the context left after the
    # prompt). None: as many as fit in max_model_len.
    default_max_tokens: int | None = 16
    max_admit_attempts: int = 3  # decode workers tried before giving up on a request
    # Times a request moves on after losing a worker (D's stream broke, P failed or timed
    # out): admitted again elsewhere, continuing the client's stream. 0: fail it instead.
    max_resumes: int = 2
    # Largest HTTP body and gRPC message the router reads; bigger ones are refused (413 /
    # RESOURCE_EXHAUSTED) before they are parsed.
    max_request_bytes: int = 4 * 1024 * 1024
    # Client API keys (splitserve.common.auth format), on top of SPLITSERVE_API_KEYS. With
    # any key configured, the gRPC SplitServe service and every HTTP path but /health (and
    # /metrics when public_metrics) need `Authorization: Bearer <key>`.
    api_keys_file: str | None = None
    public_metrics: bool = False
    # The deployment's shared secret (None: SPLITSERVE_CLUSTER_TOKEN; unset or empty: none).
    # With one, the ClusterState service and every call to a worker need it, so only
    # members register, heartbeat, read cluster state or receive requests.
    cluster_token: str | None = None
    # Closed-loop P:D control (router.pd_control): move workers started --flippable
    # between the roles to meet these objectives. None: off.
    pd_control: PDControlConfig | None = None

    @property
    def resolved_cluster_token(self) -> str | None:
        return envs.cluster_token(self.cluster_token)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in [0, 65535] or None, got {self.http_port}")
        if self.max_inflight < 0 or self.max_queued < 0:
            raise ValueError(
                f"max_inflight and max_queued must be >= 0, got {self.max_inflight}, "
                f"{self.max_queued}"
            )
        if not self.fair_share_sync_s > 0:
            raise ValueError(f"fair_share_sync_s must be > 0, got {self.fair_share_sync_s}")
        if not 0 <= self.ttft_slo_ms < 2**32:
            raise ValueError(f"ttft_slo_ms must be in [0, 2**32), got {self.ttft_slo_ms}")
        if self.route_policy not in ("load", "latency"):
            raise ValueError(f"route_policy must be load or latency, got {self.route_policy!r}")
        if self.prefill_policy not in PREFILL_POLICIES:
            raise ValueError(
                f"prefill_policy must be one of {PREFILL_POLICIES}, got {self.prefill_policy!r}"
            )
        if self.local_prefill_threshold < 0:
            raise ValueError(
                f"local_prefill_threshold must be >= 0, got {self.local_prefill_threshold}"
            )
        if not 0.0 < self.local_prefix_fraction <= 1.0:
            raise ValueError(
                f"local_prefix_fraction must be in (0, 1], got {self.local_prefix_fraction}"
            )
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.prefill_timeout_ms < 0:
            raise ValueError(f"prefill_timeout_ms must be >= 0, got {self.prefill_timeout_ms}")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.client_write_timeout_s is not None and not self.client_write_timeout_s > 0:
            raise ValueError("client_write_timeout_s must be > 0, got "
                             f"{self.client_write_timeout_s}")
        if not self.cluster_stale_s >= 0:
            raise ValueError(f"cluster_stale_s must be >= 0, got {self.cluster_stale_s}")
        if not self.worker_refresh_s >= 0:
            raise ValueError(f"worker_refresh_s must be >= 0, got {self.worker_refresh_s}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        if self.max_resumes < 0:
            raise ValueError(f"max_resumes must be >= 0, got {self.max_resumes}")
        if self.max_admit_attempts < 1:
            raise ValueError(f"max_admit_attempts must be >= 1, got {self.max_admit_attempts}")

    @property
    def embedded_cluster(self) -> bool:
        """True when the router hosts (and serves) the cluster store itself."""
        return self.cluster_url is None

    @property
    def bind_address(self) -> str:
        return f"{self.host}:{self.port}"
