from __future__ import annotations

import dataclasses

from splitserve.common.cluster_types import (
    RequestLedgerEntry,
    RequestPhase,
    WorkerInfo,
    WorkerLoadReport,
)
from splitserve.common.convert.common import role_from_proto, role_to_proto
from splitserve.common.step_time import StepTimeModel
from splitserve.v1 import cluster_pb2

_PHASE_TO_PROTO: dict[RequestPhase, cluster_pb2.RequestPhase] = {
    RequestPhase.QUEUED: cluster_pb2.REQUEST_PHASE_QUEUED,
    RequestPhase.ADMITTED: cluster_pb2.REQUEST_PHASE_ADMITTED,
    RequestPhase.PREFILLING: cluster_pb2.REQUEST_PHASE_PREFILLING,
    RequestPhase.DECODING: cluster_pb2.REQUEST_PHASE_DECODING,
    RequestPhase.FINISHED: cluster_pb2.REQUEST_PHASE_FINISHED,
}
_PHASE_FROM_PROTO: dict[int, RequestPhase] = {v: k for k, v in _PHASE_TO_PROTO.items()}


def info_to_proto(info: WorkerInfo) -> cluster_pb2.WorkerInfo:
    return cluster_pb2.WorkerInfo(
        worker_id=info.worker_id,
        role=role_to_proto(info.role),
        address=info.address,
        kv_endpoint=info.kv_endpoint,
        output_endpoint=info.output_endpoint,
        model=info.model,
        block_size=info.block_size,
        num_total_blocks=info.num_total_blocks,
        started_at_unix_s=info.started_at,
    )


def info_from_proto(msg: cluster_pb2.WorkerInfo) -> WorkerInfo:
    role = role_from_proto(msg.role)
    if role is None:
        raise ValueError("WorkerInfo.role must be set")
    return WorkerInfo(
        worker_id=msg.worker_id,
        role=role,
        address=msg.address,
        model=msg.model,
        block_size=msg.block_size,
        num_total_blocks=msg.num_total_blocks,
        kv_endpoint=msg.kv_endpoint,
        output_endpoint=msg.output_endpoint,
        started_at=msg.started_at_unix_s,
    )


def load_to_proto(load: WorkerLoadReport) -> cluster_pb2.WorkerLoadReport:
    return cluster_pb2.WorkerLoadReport(
        num_waiting=load.num_waiting,
        num_running=load.num_running,
        num_free_blocks=load.num_free_blocks,
        num_queued_tokens=load.num_queued_tokens,
        updated_at_unix_s=load.updated_at,
        step_model=(None if load.step_model is None else
                    cluster_pb2.StepTimeModel(**dataclasses.asdict(load.step_model))),
    )


def load_from_proto(msg: cluster_pb2.WorkerLoadReport) -> WorkerLoadReport:
    return WorkerLoadReport(
        num_waiting=msg.num_waiting,
        num_running=msg.num_running,
        num_free_blocks=msg.num_free_blocks,
        num_queued_tokens=msg.num_queued_tokens,
        updated_at=msg.updated_at_unix_s,
        step_model=(StepTimeModel(msg.step_model.base_ms, msg.step_model.per_seq_ms,
                                  msg.step_model.per_prompt_token_ms,
                                  msg.step_model.token_budget)
                    if msg.HasField("step_model") else None),
    )


def entry_to_proto(entry: RequestLedgerEntry) -> cluster_pb2.RequestLedgerEntry:
    return cluster_pb2.RequestLedgerEntry(
        request_id=entry.request_id,
        phase=_PHASE_TO_PROTO[entry.phase],
        prefill_worker_id=entry.prefill_worker_id,
        decode_worker_id=entry.decode_worker_id,
        num_prompt_tokens=entry.num_prompt_tokens,
        num_prefill_blocks=entry.num_prefill_blocks,
        num_decode_blocks=entry.num_decode_blocks,
        num_generated_tokens=entry.num_generated_tokens,
        updated_at_unix_s=entry.updated_at,
    )


def entry_from_proto(msg: cluster_pb2.RequestLedgerEntry) -> RequestLedgerEntry:
    if msg.phase not in _PHASE_FROM_PROTO:
        raise ValueError(f"RequestLedgerEntry.phase must be set, got {msg.phase}")
    return RequestLedgerEntry(
        request_id=msg.request_id,
        phase=_PHASE_FROM_PROTO[msg.phase],
        prefill_worker_id=msg.prefill_worker_id,
        decode_worker_id=msg.decode_worker_id,
        num_prompt_tokens=msg.num_prompt_tokens,
        num_prefill_blocks=msg.num_prefill_blocks,
        num_decode_blocks=msg.num_decode_blocks,
        num_generated_tokens=msg.num_generated_tokens,
        updated_at=msg.updated_at_unix_s,
    )
