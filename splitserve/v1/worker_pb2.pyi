from splitserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdmitRefusal(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADMIT_REFUSAL_UNSPECIFIED: _ClassVar[AdmitRefusal]
    ADMIT_REFUSAL_NO_FREE_BLOCKS: _ClassVar[AdmitRefusal]
    ADMIT_REFUSAL_DRAINING: _ClassVar[AdmitRefusal]
    ADMIT_REFUSAL_TOO_LONG: _ClassVar[AdmitRefusal]
    ADMIT_REFUSAL_DUPLICATE_REQUEST_ID: _ClassVar[AdmitRefusal]
    ADMIT_REFUSAL_PEER_UNREACHABLE: _ClassVar[AdmitRefusal]
ADMIT_REFUSAL_UNSPECIFIED: AdmitRefusal
ADMIT_REFUSAL_NO_FREE_BLOCKS: AdmitRefusal
ADMIT_REFUSAL_DRAINING: AdmitRefusal
ADMIT_REFUSAL_TOO_LONG: AdmitRefusal
ADMIT_REFUSAL_DUPLICATE_REQUEST_ID: AdmitRefusal
ADMIT_REFUSAL_PEER_UNREACHABLE: AdmitRefusal

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling_params", "decode_worker_id", "decode_kv_endpoint", "decode_block_ids", "decode_num_cached_tokens", "kv_layout", "num_sampled", "priority")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    DECODE_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DECODE_KV_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    DECODE_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLED_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: _common_pb2.SamplingParams
    decode_worker_id: str
    decode_kv_endpoint: str
    decode_block_ids: _containers.RepeatedScalarFieldContainer[int]
    decode_num_cached_tokens: int
    kv_layout: _common_pb2.KVLayout
    num_sampled: int
    priority: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., decode_worker_id: _Optional[str] = ..., decode_kv_endpoint: _Optional[str] = ..., decode_block_ids: _Optional[_Iterable[int]] = ..., decode_num_cached_tokens: _Optional[int] = ..., kv_layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., num_sampled: _Optional[int] = ..., priority: _Optional[int] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("request_id", "prefill_worker_id", "first_token_id", "first_token_logprob", "num_prompt_tokens", "num_cached_tokens", "queue_ms", "compute_ms", "kv_transfer_ms", "kv_transfer_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prefill_worker_id: str
    first_token_id: int
    first_token_logprob: _common_pb2.TokenLogprob
    num_prompt_tokens: int
    num_cached_tokens: int
    queue_ms: float
    compute_ms: float
    kv_transfer_ms: float
    kv_transfer_bytes: int
    def __init__(self, request_id: _Optional[str] = ..., prefill_worker_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., first_token_logprob: _Optional[_Union[_common_pb2.TokenLogprob, _Mapping]] = ..., num_prompt_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., kv_transfer_ms: _Optional[float] = ..., kv_transfer_bytes: _Optional[int] = ...) -> None: ...

class PrefillAbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class PrefillAbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class PrefillStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrefillStatsResponse(_message.Message):
    __slots__ = ("worker_id", "role", "load", "counters", "kv_layout", "draining", "model")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: _common_pb2.WorkerRole
    load: _common_pb2.WorkerLoad
    counters: _common_pb2.WorkerCounters
    kv_layout: _common_pb2.KVLayout
    draining: bool
    model: str
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., load: _Optional[_Union[_common_pb2.WorkerLoad, _Mapping]] = ..., counters: _Optional[_Union[_common_pb2.WorkerCounters, _Mapping]] = ..., kv_layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., draining: _Optional[bool] = ..., model: _Optional[str] = ...) -> None: ...

class PrefillDrainRequest(_message.Message):
    __slots__ = ("wait_timeout_ms",)
    WAIT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    wait_timeout_ms: int
    def __init__(self, wait_timeout_ms: _Optional[int] = ...) -> None: ...

class PrefillDrainResponse(_message.Message):
    __slots__ = ("num_in_flight_requests",)
    NUM_IN_FLIGHT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    num_in_flight_requests: int
    def __init__(self, num_in_flight_requests: _Optional[int] = ...) -> None: ...

class AdmitRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling_params", "prefill_locally", "prefill_worker_id", "prefill_kv_endpoint", "prefill_timeout_ms", "num_sampled", "priority", "stream_pace_tokens_per_s", "client", "output_channel")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_LOCALLY_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_KV_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLED_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    STREAM_PACE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: _common_pb2.SamplingParams
    prefill_locally: bool
    prefill_worker_id: str
    prefill_kv_endpoint: str
    prefill_timeout_ms: int
    num_sampled: int
    priority: int
    stream_pace_tokens_per_s: float
    client: str
    output_channel: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., prefill_locally: _Optional[bool] = ..., prefill_worker_id: _Optional[str] = ..., prefill_kv_endpoint: _Optional[str] = ..., prefill_timeout_ms: _Optional[int] = ..., num_sampled: _Optional[int] = ..., priority: _Optional[int] = ..., stream_pace_tokens_per_s: _Optional[float] = ..., client: _Optional[str] = ..., output_channel: _Optional[str] = ...) -> None: ...

class Admission(_message.Message):
    __slots__ = ("accepted", "refusal", "refusal_message", "decode_worker_id", "block_ids", "num_cached_tokens", "kv_layout", "kv_endpoint", "output_channel", "output_endpoint")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DECODE_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    KV_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    refusal: AdmitRefusal
    refusal_message: str
    decode_worker_id: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_cached_tokens: int
    kv_layout: _common_pb2.KVLayout
    kv_endpoint: str
    output_channel: bool
    output_endpoint: str
    def __init__(self, accepted: _Optional[bool] = ..., refusal: _Optional[_Union[AdmitRefusal, str]] = ..., refusal_message: _Optional[str] = ..., decode_worker_id: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., num_cached_tokens: _Optional[int] = ..., kv_layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., kv_endpoint: _Optional[str] = ..., output_channel: _Optional[bool] = ..., output_endpoint: _Optional[str] = ...) -> None: ...

class OutputChannelHello(_message.Message):
    __slots__ = ("channel_id", "token")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    channel_id: str
    token: str
    def __init__(self, channel_id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class ChannelOutput(_message.Message):
    __slots__ = ("request_id", "output")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    output: DecodeOutput
    def __init__(self, request_id: _Optional[str] = ..., output: _Optional[_Union[DecodeOutput, _Mapping]] = ...) -> None: ...

class DecodeTimings(_message.Message):
    __slots__ = ("prefill_queue_ms", "prefill_compute_ms", "kv_wait_ms", "decode_queue_ms", "decode_ms", "kv_transfer_bytes")
    PREFILL_QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    KV_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    prefill_queue_ms: float
    prefill_compute_ms: float
    kv_wait_ms: float
    decode_queue_ms: float
    decode_ms: float
    kv_transfer_bytes: int
    def __init__(self, prefill_queue_ms: _Optional[float] = ..., prefill_compute_ms: _Optional[float] = ..., kv_wait_ms: _Optional[float] = ..., decode_queue_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., kv_transfer_bytes: _Optional[int] = ...) -> None: ...

class DecodeOutput(_message.Message):
    __slots__ = ("token_ids", "logprobs", "finish_reason", "num_generated_tokens", "timings", "error_message", "num_cached_tokens", "migrate", "migrate_kv_tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIGRATE_FIELD_NUMBER: _ClassVar[int]
    MIGRATE_KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    finish_reason: _common_pb2.FinishReason
    num_generated_tokens: int
    timings: DecodeTimings
    error_message: str
    num_cached_tokens: int
    migrate: bool
    migrate_kv_tokens: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., num_generated_tokens: _Optional[int] = ..., timings: _Optional[_Union[DecodeTimings, _Mapping]] = ..., error_message: _Optional[str] = ..., num_cached_tokens: _Optional[int] = ..., migrate: _Optional[bool] = ..., migrate_kv_tokens: _Optional[int] = ...) -> None: ...

class ShipKVRequest(_message.Message):
    __slots__ = ("request_id", "transfer_request_id", "dst_worker_id", "dst_kv_endpoint", "dst_block_ids", "kv_layout")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DST_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DST_KV_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    DST_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transfer_request_id: str
    dst_worker_id: str
    dst_kv_endpoint: str
    dst_block_ids: _containers.RepeatedScalarFieldContainer[int]
    kv_layout: _common_pb2.KVLayout
    def __init__(self, request_id: _Optional[str] = ..., transfer_request_id: _Optional[str] = ..., dst_worker_id: _Optional[str] = ..., dst_kv_endpoint: _Optional[str] = ..., dst_block_ids: _Optional[_Iterable[int]] = ..., kv_layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ...) -> None: ...

class ShipKVResponse(_message.Message):
    __slots__ = ("kv_transfer_bytes", "kv_transfer_ms")
    KV_TRANSFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    kv_transfer_bytes: int
    kv_transfer_ms: float
    def __init__(self, kv_transfer_bytes: _Optional[int] = ..., kv_transfer_ms: _Optional[float] = ...) -> None: ...

class AdmitResponse(_message.Message):
    __slots__ = ("admission", "output")
    ADMISSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    admission: Admission
    output: DecodeOutput
    def __init__(self, admission: _Optional[_Union[Admission, _Mapping]] = ..., output: _Optional[_Union[DecodeOutput, _Mapping]] = ...) -> None: ...

class PrefillDoneRequest(_message.Message):
    __slots__ = ("request_id", "prefill_worker_id", "first_token_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prefill_worker_id: str
    first_token_id: int
    def __init__(self, request_id: _Optional[str] = ..., prefill_worker_id: _Optional[str] = ..., first_token_id: _Optional[int] = ...) -> None: ...

class PrefillDoneResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class DecodeAbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class DecodeAbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class DecodeStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DecodeStatsResponse(_message.Message):
    __slots__ = ("worker_id", "role", "load", "counters", "kv_layout", "draining", "model")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: _common_pb2.WorkerRole
    load: _common_pb2.WorkerLoad
    counters: _common_pb2.WorkerCounters
    kv_layout: _common_pb2.KVLayout
    draining: bool
    model: str
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., load: _Optional[_Union[_common_pb2.WorkerLoad, _Mapping]] = ..., counters: _Optional[_Union[_common_pb2.WorkerCounters, _Mapping]] = ..., kv_layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., draining: _Optional[bool] = ..., model: _Optional[str] = ...) -> None: ...

class DecodeDrainRequest(_message.Message):
    __slots__ = ("wait_timeout_ms",)
    WAIT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    wait_timeout_ms: int
    def __init__(self, wait_timeout_ms: _Optional[int] = ...) -> None: ...

class DecodeDrainResponse(_message.Message):
    __slots__ = ("num_in_flight_requests",)
    NUM_IN_FLIGHT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    num_in_flight_requests: int
    def __init__(self, num_in_flight_requests: _Optional[int] = ...) -> None: ...

class SwitchRoleRequest(_message.Message):
    __slots__ = ("target_role", "drain_timeout_ms", "allow_last_of_role")
    TARGET_ROLE_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_LAST_OF_ROLE_FIELD_NUMBER: _ClassVar[int]
    target_role: _common_pb2.WorkerRole
    drain_timeout_ms: int
    allow_last_of_role: bool
    def __init__(self, target_role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., drain_timeout_ms: _Optional[int] = ..., allow_last_of_role: _Optional[bool] = ...) -> None: ...

class SwitchRoleResponse(_message.Message):
    __slots__ = ("worker_id", "previous_role", "role", "switched", "drain_ms", "rebuild_ms", "num_aborted_requests")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_ROLE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SWITCHED_FIELD_NUMBER: _ClassVar[int]
    DRAIN_MS_FIELD_NUMBER: _ClassVar[int]
    REBUILD_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_ABORTED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    previous_role: _common_pb2.WorkerRole
    role: _common_pb2.WorkerRole
    switched: bool
    drain_ms: float
    rebuild_ms: float
    num_aborted_requests: int
    def __init__(self, worker_id: _Optional[str] = ..., previous_role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., switched: _Optional[bool] = ..., drain_ms: _Optional[float] = ..., rebuild_ms: _Optional[float] = ..., num_aborted_requests: _Optional[int] = ...) -> None: ...
