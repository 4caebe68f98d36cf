"""Translation between the store's dataclasses and the splitserve.v1 cluster messages."""

from __future__ import annotations

from cluster.store import (
    RequestLedgerEntry,
    RequestPhase,
    WorkerInfo,
    WorkerLoadReport,
    WorkerRole,
)
from splitserve.v1 import cluster_pb2, common_pb2

_ROLE_TO_PB: dict[WorkerRole, common_pb2.WorkerRole] = {
    WorkerRole.PREFILL: common_pb2.WORKER_ROLE_PREFILL,
    WorkerRole.DECODE: common_pb2.WORKER_ROLE_DECODE,
    WorkerRole.BOTH: common_pb2.WORKER_ROLE_BOTH,
}
_ROLE_FROM_PB: dict[int, WorkerRole] = {v: k for k, v in _ROLE_TO_PB.items()}

_PHASE_TO_PB: dict[RequestPhase, cluster_pb2.RequestPhase] = {
    RequestPhase.QUEUED: cluster_pb2.REQUEST_PHASE_QUEUED,
    RequestPhase.ADMITTED: cluster_pb2.REQUEST_PHASE_ADMITTED,
    RequestPhase.PREFILLING: cluster_pb2.REQUEST_PHASE_PREFILLING,
    RequestPhase.DECODING: cluster_pb2.REQUEST_PHASE_DECODING,
    RequestPhase.FINISHED: cluster_pb2.REQUEST_PHASE_FINISHED,
}
_PHASE_FROM_PB: dict[int, RequestPhase] = {v: k for k, v in _PHASE_TO_PB.items()}


def role_to_pb(role: WorkerRole | None) -> common_pb2.WorkerRole:
    """None (no filter) is WORKER_ROLE_UNSPECIFIED."""
    return common_pb2.WORKER_ROLE_UNSPECIFIED if role is None else _ROLE_TO_PB[role]


def role_from_pb(value: int) -> WorkerRole | None:
    """WORKER_ROLE_UNSPECIFIED is None; an unknown value raises ValueError."""
    if value == common_pb2.WORKER_ROLE_UNSPECIFIED:
        return None
    if value not in _ROLE_FROM_PB:
        raise ValueError(f"unknown WorkerRole {value}")
    return _ROLE_FROM_PB[value]


def info_to_pb(info: WorkerInfo) -> cluster_pb2.WorkerInfo:
    return cluster_pb2.WorkerInfo(
        worker_id=info.worker_id,
        role=_ROLE_TO_PB[info.role],
        address=info.address,
        kv_endpoint=info.kv_endpoint,
        model=info.model,
        block_size=info.block_size,
        num_total_blocks=info.num_total_blocks,
        started_at_unix_s=info.started_at,
    )


def info_from_pb(msg: cluster_pb2.WorkerInfo) -> WorkerInfo:
    role = role_from_pb(msg.role)
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
        started_at=msg.started_at_unix_s,
    )


def load_to_pb(load: WorkerLoadReport) -> cluster_pb2.WorkerLoadReport:
    return cluster_pb2.WorkerLoadReport(
        num_waiting=load.num_waiting,
        num_running=load.num_running,
        num_free_blocks=load.num_free_blocks,
        num_queued_tokens=load.num_queued_tokens,
        updated_at_unix_s=load.updated_at,
    )


def load_from_pb(msg: cluster_pb2.WorkerLoadReport) -> WorkerLoadReport:
    return WorkerLoadReport(
        num_waiting=msg.num_waiting,
        num_running=msg.num_running,
        num_free_blocks=msg.num_free_blocks,
        num_queued_tokens=msg.num_queued_tokens,
        updated_at=msg.updated_at_unix_s,
    )


def entry_to_pb(entry: RequestLedgerEntry) -> cluster_pb2.RequestLedgerEntry:
    return cluster_pb2.RequestLedgerEntry(
        request_id=entry.request_id,
        phase=_PHASE_TO_PB[entry.phase],
        prefill_worker_id=entry.prefill_worker_id,
        decode_worker_id=entry.decode_worker_id,
        num_prompt_tokens=entry.num_prompt_tokens,
        num_prefill_blocks=entry.num_prefill_blocks,
        num_decode_blocks=entry.num_decode_blocks,
        num_generated_tokens=entry.num_generated_tokens,
        updated_at_unix_s=entry.updated_at,
    )


def entry_from_pb(msg: cluster_pb2.RequestLedgerEntry) -> RequestLedgerEntry:
    if msg.phase not in _PHASE_FROM_PB:
        raise ValueError(f"RequestLedgerEntry.phase must be set, got {msg.phase}")
    return RequestLedgerEntry(
        request_id=msg.request_id,
        phase=_PHASE_FROM_PB[msg.phase],
        prefill_worker_id=msg.prefill_worker_id,
        decode_worker_id=msg.decode_worker_id,
        num_prompt_tokens=msg.num_prompt_tokens,
        num_prefill_blocks=msg.num_prefill_blocks,
        num_decode_blocks=msg.num_decode_blocks,
        num_generated_tokens=msg.num_generated_tokens,
        updated_at=msg.updated_at_unix_s,
    )
