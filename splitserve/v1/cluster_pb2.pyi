from splitserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RequestPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REQUEST_PHASE_UNSPECIFIED: _ClassVar[RequestPhase]
    REQUEST_PHASE_QUEUED: _ClassVar[RequestPhase]
    REQUEST_PHASE_ADMITTED: _ClassVar[RequestPhase]
    REQUEST_PHASE_PREFILLING: _ClassVar[RequestPhase]
    REQUEST_PHASE_DECODING: _ClassVar[RequestPhase]
    REQUEST_PHASE_FINISHED: _ClassVar[RequestPhase]

class KvTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_TIER_UNSPECIFIED: _ClassVar[KvTier]
    KV_TIER_DEVICE: _ClassVar[KvTier]
    KV_TIER_HOST: _ClassVar[KvTier]
    KV_TIER_DISK: _ClassVar[KvTier]
REQUEST_PHASE_UNSPECIFIED: RequestPhase
REQUEST_PHASE_QUEUED: RequestPhase
REQUEST_PHASE_ADMITTED: RequestPhase
REQUEST_PHASE_PREFILLING: RequestPhase
REQUEST_PHASE_DECODING: RequestPhase
REQUEST_PHASE_FINISHED: RequestPhase
KV_TIER_UNSPECIFIED: KvTier
KV_TIER_DEVICE: KvTier
KV_TIER_HOST: KvTier
KV_TIER_DISK: KvTier

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "role", "address", "kv_endpoint", "model", "block_size", "num_total_blocks", "started_at_unix_s", "output_endpoint")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: _common_pb2.WorkerRole
    address: str
    kv_endpoint: str
    model: str
    block_size: int
    num_total_blocks: int
    started_at_unix_s: float
    output_endpoint: str
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., address: _Optional[str] = ..., kv_endpoint: _Optional[str] = ..., model: _Optional[str] = ..., block_size: _Optional[int] = ..., num_total_blocks: _Optional[int] = ..., started_at_unix_s: _Optional[float] = ..., output_endpoint: _Optional[str] = ...) -> None: ...

class WorkerLoadReport(_message.Message):
    __slots__ = ("num_waiting", "num_running", "num_free_blocks", "num_queued_tokens", "updated_at_unix_s", "step_model")
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    STEP_MODEL_FIELD_NUMBER: _ClassVar[int]
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_queued_tokens: int
    updated_at_unix_s: float
    step_model: StepTimeModel
    def __init__(self, num_waiting: _Optional[int] = ..., num_running: _Optional[int] = ..., num_free_blocks: _Optional[int] = ..., num_queued_tokens: _Optional[int] = ..., updated_at_unix_s: _Optional[float] = ..., step_model: _Optional[_Union[StepTimeModel, _Mapping]] = ...) -> None: ...

class StepTimeModel(_message.Message):
    __slots__ = ("base_ms", "per_seq_ms", "per_prompt_token_ms", "token_budget")
    BASE_MS_FIELD_NUMBER: _ClassVar[int]
    PER_SEQ_MS_FIELD_NUMBER: _ClassVar[int]
    PER_PROMPT_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    base_ms: float
    per_seq_ms: float
    per_prompt_token_ms: float
    token_budget: int
    def __init__(self, base_ms: _Optional[float] = ..., per_seq_ms: _Optional[float] = ..., per_prompt_token_ms: _Optional[float] = ..., token_budget: _Optional[int] = ...) -> None: ...

class RequestLedgerEntry(_message.Message):
    __slots__ = ("request_id", "phase", "prefill_worker_id", "decode_worker_id", "num_prompt_tokens", "num_prefill_blocks", "num_decode_blocks", "num_generated_tokens", "updated_at_unix_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DECODE_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFILL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    phase: RequestPhase
    prefill_worker_id: str
    decode_worker_id: str
    num_prompt_tokens: int
    num_prefill_blocks: int
    num_decode_blocks: int
    num_generated_tokens: int
    updated_at_unix_s: float
    def __init__(self, request_id: _Optional[str] = ..., phase: _Optional[_Union[RequestPhase, str]] = ..., prefill_worker_id: _Optional[str] = ..., decode_worker_id: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., num_prefill_blocks: _Optional[int] = ..., num_decode_blocks: _Optional[int] = ..., num_generated_tokens: _Optional[int] = ..., updated_at_unix_s: _Optional[float] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("info", "ttl_ms")
    INFO_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    info: WorkerInfo
    ttl_ms: int
    def __init__(self, info: _Optional[_Union[WorkerInfo, _Mapping]] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "load", "ttl_ms")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    load: WorkerLoadReport
    ttl_ms: int
    def __init__(self, worker_id: _Optional[str] = ..., load: _Optional[_Union[WorkerLoadReport, _Mapping]] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("live",)
    LIVE_FIELD_NUMBER: _ClassVar[int]
    live: bool
    def __init__(self, live: _Optional[bool] = ...) -> None: ...

class DeregisterWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DeregisterWorkerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LiveWorkersRequest(_message.Message):
    __slots__ = ("role",)
    ROLE_FIELD_NUMBER: _ClassVar[int]
    role: _common_pb2.WorkerRole
    def __init__(self, role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ...) -> None: ...

class LiveWorker(_message.Message):
    __slots__ = ("info", "load")
    INFO_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    info: WorkerInfo
    load: WorkerLoadReport
    def __init__(self, info: _Optional[_Union[WorkerInfo, _Mapping]] = ..., load: _Optional[_Union[WorkerLoadReport, _Mapping]] = ...) -> None: ...

class LiveWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[LiveWorker]
    def __init__(self, workers: _Optional[_Iterable[_Union[LiveWorker, _Mapping]]] = ...) -> None: ...

class PublishPrefixEventsRequest(_message.Message):
    __slots__ = ("worker_id", "stored_hashes", "evicted_hashes", "tier")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STORED_HASHES_FIELD_NUMBER: _ClassVar[int]
    EVICTED_HASHES_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    stored_hashes: _containers.RepeatedScalarFieldContainer[int]
    evicted_hashes: _containers.RepeatedScalarFieldContainer[int]
    tier: KvTier
    def __init__(self, worker_id: _Optional[str] = ..., stored_hashes: _Optional[_Iterable[int]] = ..., evicted_hashes: _Optional[_Iterable[int]] = ..., tier: _Optional[_Union[KvTier, str]] = ...) -> None: ...

class PublishPrefixEventsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrefixOverlapRequest(_message.Message):
    __slots__ = ("block_hashes", "with_tiers")
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    WITH_TIERS_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    with_tiers: bool
    def __init__(self, block_hashes: _Optional[_Iterable[int]] = ..., with_tiers: _Optional[bool] = ...) -> None: ...

class PrefixTierRun(_message.Message):
    __slots__ = ("device_blocks", "host_blocks", "disk_blocks")
    DEVICE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DISK_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    device_blocks: int
    host_blocks: int
    disk_blocks: int
    def __init__(self, device_blocks: _Optional[int] = ..., host_blocks: _Optional[int] = ..., disk_blocks: _Optional[int] = ...) -> None: ...

class PrefixOverlapResponse(_message.Message):
    __slots__ = ("num_cached_blocks", "tier_runs")
    class NumCachedBlocksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class TierRunsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: PrefixTierRun
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[PrefixTierRun, _Mapping]] = ...) -> None: ...
    NUM_CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TIER_RUNS_FIELD_NUMBER: _ClassVar[int]
    num_cached_blocks: _containers.ScalarMap[str, int]
    tier_runs: _containers.MessageMap[str, PrefixTierRun]
    def __init__(self, num_cached_blocks: _Optional[_Mapping[str, int]] = ..., tier_runs: _Optional[_Mapping[str, PrefixTierRun]] = ...) -> None: ...

class LedgerPutRequest(_message.Message):
    __slots__ = ("entry",)
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    entry: RequestLedgerEntry
    def __init__(self, entry: _Optional[_Union[RequestLedgerEntry, _Mapping]] = ...) -> None: ...

class LedgerPutResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LedgerGetRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class LedgerGetResponse(_message.Message):
    __slots__ = ("found", "entry")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    found: bool
    entry: RequestLedgerEntry
    def __init__(self, found: _Optional[bool] = ..., entry: _Optional[_Union[RequestLedgerEntry, _Mapping]] = ...) -> None: ...

class LedgerDeleteRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class LedgerDeleteResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class LedgerByWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class LedgerByWorkerResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[RequestLedgerEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[RequestLedgerEntry, _Mapping]]] = ...) -> None: ...

class AddServiceRequest(_message.Message):
    __slots__ = ("deltas",)
    class DeltasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    deltas: _containers.ScalarMap[str, float]
    def __init__(self, deltas: _Optional[_Mapping[str, float]] = ...) -> None: ...

class AddServiceResponse(_message.Message):
    __slots__ = ("totals",)
    class TotalsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    totals: _containers.ScalarMap[str, float]
    def __init__(self, totals: _Optional[_Mapping[str, float]] = ...) -> None: ...
