"""Plain-string encoding of the store's dataclasses, for Redis hashes (never pickle).

Ints are decimal, floats use `repr` (shortest round-trip form), enums their value. A load
report shares its worker's hash under "load."-prefixed fields.
"""

from __future__ import annotations

from collections.abc import Mapping

from splitserve.cluster.store import (
    LiveWorker,
    RequestLedgerEntry,
    RequestPhase,
    WorkerInfo,
    WorkerLoadReport,
    WorkerRole,
)
from splitserve.common.step_time import StepTimeModel

_INFO_FIELDS = ("worker_id", "role", "address", "model", "block_size", "num_total_blocks",
                "kv_endpoint", "started_at", "output_endpoint")  # (every field of WorkerInfo)
_LOAD_PREFIX = "load."
_LOAD_INTS = ("num_waiting", "num_running", "num_free_blocks", "num_queued_tokens")
_ENTRY_INTS = (
    "num_prompt_tokens",
    "num_prefill_blocks",
    "num_decode_blocks",
    "num_generated_tokens",
)


def encode_info(info: WorkerInfo) -> dict[str, str]:
    return {
        "worker_id": info.worker_id,
        "role": info.role.value,
        "address": info.address,
        "model": info.model,
        "block_size": str(info.block_size),
        "num_total_blocks": str(info.num_total_blocks),
        "kv_endpoint": info.kv_endpoint,
        "started_at": repr(info.started_at),
        "output_endpoint": info.output_endpoint,
    }


def decode_info(fields: Mapping[str, str]) -> WorkerInfo:
    return WorkerInfo(
        worker_id=fields["worker_id"],
        role=WorkerRole(fields["role"]),
        address=fields["address"],
        model=fields["model"],
        block_size=int(fields["block_size"]),
        num_total_blocks=int(fields["num_total_blocks"]),
        kv_endpoint=fields["kv_endpoint"],
        started_at=float(fields["started_at"]),
        output_endpoint=fields.get("output_endpoint", ""),  # (absent: an older worker's)
    )


def encode_load(load: WorkerLoadReport) -> dict[str, str]:
    fields = {_LOAD_PREFIX + name: str(getattr(load, name)) for name in _LOAD_INTS}
    fields[_LOAD_PREFIX + "updated_at"] = repr(load.updated_at)
    # One field, so a reader never sees half of an update ("" when none yet).
    model = load.step_model
    fields[_LOAD_PREFIX + "step_model"] = "" if model is None else ",".join(
        (repr(model.base_ms), repr(model.per_seq_ms), repr(model.per_prompt_token_ms),
         str(model.token_budget)))
    return fields


def _decode_step_model(text: str | None) -> StepTimeModel | None:
    if not text:
        return None
    base, per_seq, per_token, budget = text.split(",")
    return StepTimeModel(float(base), float(per_seq), float(per_token), int(budget))


def decode_load(fields: Mapping[str, str]) -> WorkerLoadReport | None:
    """The load report stored beside a worker's info, or None if it never reported one."""
    if _LOAD_PREFIX + "updated_at" not in fields:
        return None
    counts = {name: int(fields[_LOAD_PREFIX + name]) for name in _LOAD_INTS}
    return WorkerLoadReport(**counts, updated_at=float(fields[_LOAD_PREFIX + "updated_at"]),
                            step_model=_decode_step_model(fields.get(_LOAD_PREFIX + "step_model")))


def encode_entry(entry: RequestLedgerEntry) -> dict[str, str]:
    fields = {
        "request_id": entry.request_id,
        "phase": entry.phase.value,
        "prefill_worker_id": entry.prefill_worker_id,
        "decode_worker_id": entry.decode_worker_id,
        "updated_at": repr(entry.updated_at),
    }
    fields.update({name: str(getattr(entry, name)) for name in _ENTRY_INTS})
    return fields


def decode_entry(fields: Mapping[str, str]) -> RequestLedgerEntry:
    return RequestLedgerEntry(
        request_id=fields["request_id"],
        phase=RequestPhase(fields["phase"]),
        prefill_worker_id=fields["prefill_worker_id"],
        decode_worker_id=fields["decode_worker_id"],
        updated_at=float(fields["updated_at"]),
        **{name: int(fields[name]) for name in _ENTRY_INTS},
    )


class WorkerDecoder:
    """Decodes worker hashes read again and again (every read of the live workers), each
    only when it changed: a hash equal to its last read gives the same (info, load)
    objects, and an unchanged registration the same info. Not thread-safe."""

    def __init__(self) -> None:
        # worker_id -> (its hash as read: field, value, ...; its info fields; the decoded)
        self._last: dict[str, tuple[list[str], tuple[str, ...], LiveWorker]] = {}

    def decode(self, hashes: list[tuple[str, list[str]]]) -> tuple[list[LiveWorker], list[str]]:
        """(worker_id, its hash flattened) pairs -> the live workers, in the given order,
        and the ids whose hash is gone or has no registration."""
        live: list[LiveWorker] = []
        gone: list[str] = []
        last, self._last = self._last, {}
        for wid, flat in hashes:
            seen = last.get(wid)
            if seen is not None and seen[0] == flat:
                self._last[wid] = seen
                live.append(seen[2])
                continue
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            if "worker_id" not in fields:
                gone.append(wid)
                continue
            info_fields = tuple(fields.get(name, "") for name in _INFO_FIELDS)
            same = seen is not None and seen[1] == info_fields
            entry = (seen[2][0] if same and seen else decode_info(fields), decode_load(fields))
            self._last[wid] = (flat, info_fields, entry)
            live.append(entry)
        return live, gone
