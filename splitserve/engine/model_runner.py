"""The bridge from a scheduler plan to tensors: builds inputs, runs the model, samples.

The only engine module that turns bookkeeping (block tables, token counts) into tensors.
It owns the model weights and the KV pool:
  kv_pool: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
           (the model's dtype, or a bf16 / fp16 cache's; int8 or fp8 KV cache: head_dim
           + 2 bytes per row, kernels.kv_quant)
  (index 0 of the second dim is K, 1 is V).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from splitserve.engine.attention import AttentionMetadata, PrefillSpan
from splitserve.engine.config import FLOAT_KV_CACHE_DTYPES, EngineConfig
from splitserve.engine.cpu_linear import prepack_linears, prepack_supported
from splitserve.engine.cuda_graphs import DecodeGraphs, capture_sizes
from splitserve.engine.grammar import StepMasks
from splitserve.engine.model import LayerHook, ModelArch
from splitserve.engine.sampler import SampleResult, TokenHistory, sample
from splitserve.engine.scheduler import ScheduledSequence
from splitserve.engine.sequence import Sequence
from splitserve.engine.weights import build_model
from splitserve.kernels.backend import get_attention_ops
from splitserve.kernels.kv_quant import STORAGE_DTYPES, check_device, row_width

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass(slots=True)
class StepBatch:
    """The tensors of one step and which scheduled sequences sample at its end."""

    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # int64 [num_sampling]: rows whose hidden state is sampled
    sampling: list[ScheduledSequence]  # in the order of sample_rows


def configure_cpu_threads(num_threads: int) -> None:
    torch.set_num_threads(num_threads)
    # Denormals make random-weight models ~3x slower on CPU; they change no greedy token.
    torch.set_flush_denormal(True)


class ModelRunner:
    def __init__(self, config: EngineConfig, arch: ModelArch, model_dir: Path):
        self.config = config
        self.arch = arch
        self.device = torch.device(config.resolved_device)
        self.dtype = _DTYPES[config.resolved_dtype]
        if self.device.type == "cpu":
            configure_cpu_threads(config.resolved_num_threads)
        self.block_size = config.block_size
        max_positions = arch.max_position_embeddings
        self.model = build_model(arch, model_dir, self.dtype, str(self.device), max_positions)
        if config.cpu_weight_prepack and prepack_supported(self.dtype, self.device):
            prepack_linears(self.model, self.dtype)
        if config.kv_cache_dtype in STORAGE_DTYPES:
            check_device(config.kv_cache_dtype, self.device)
        self.ops = get_attention_ops(config.attention_backend, self.device)
        self.num_blocks = self._num_kv_blocks()
        shape = (arch.num_layers, 2, self.num_blocks, self.block_size)
        self.kv_pool = torch.zeros(
            *shape, arch.num_kv_heads, self.kv_row_width, dtype=self.kv_dtype, device=self.device
        )
        self.kv_caches = [(self.kv_pool[i, 0], self.kv_pool[i, 1]) for i in range(arch.num_layers)]
        # Decode steps through static buffers: CUDA graphs on a GPU with the Triton kernels
        # (not for a prefill-only engine: its steps are prompt chunks).
        self.graphs: DecodeGraphs | None = None
        if (self.device.type == "cuda" and self.ops.name == "triton" and not config.enforce_eager
                and config.role != "prefill"):
            self.graphs = self.build_decode_graphs(capture=True)

    # ---- sizing --------------------------------------------------------------------------
    @property
    def kv_dtype(self) -> torch.dtype:
        """The pool's storage dtype: the model's, a half-width float's (bfloat16, float16), or
        a quantized codec's (int8; uint8 for fp8: the bytes of e4m3 values, kernels.kv_quant)."""
        name = self.config.kv_cache_dtype
        if name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        return _DTYPES[name] if name in FLOAT_KV_CACHE_DTYPES else self.dtype

    @property
    def kv_quantized(self) -> bool:
        return self.config.kv_cache_dtype in STORAGE_DTYPES

    @property
    def kv_layout_dtype(self) -> str:
        """The KV layout's dtype name (common.kv_layout): "int8", "fp8", or the float
        cache's ("bfloat16" for a bf16 model's own cache and for an fp32 model's bf16 one:
        the same bytes)."""
        if self.kv_quantized:
            return self.config.kv_cache_dtype
        return str(self.kv_dtype).removeprefix("torch.")

    @property
    def kv_row_width(self) -> int:
        """Elements of one (token, kv head) row: head_dim, or its quantized values + scale."""
        head_dim = self.arch.head_dim
        return row_width(head_dim) if self.kv_quantized else head_dim

    @property
    def kv_bytes_per_block(self) -> int:
        a = self.arch
        elem = torch.tensor([], dtype=self.kv_dtype).element_size()
        return a.num_layers * 2 * self.block_size * a.num_kv_heads * self.kv_row_width * elem

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        budget = self.config.kv_cache_memory_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * 0.9)
            else:
                budget = _DEFAULT_CPU_KV_BYTES
        num_blocks = budget // self.kv_bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"KV memory budget {budget} bytes holds no block")
        return int(num_blocks)

    # ---- decode graphs --------------------------------------------------------------------
    def build_decode_graphs(self, capture: bool, num_sms: int | None = None) -> DecodeGraphs:
        """Static decode buffers for batch sizes up to max_num_seqs, with a CUDA graph per
        size when `capture` (else each step runs eagerly on them: how CPU tests check the
        padding and bucketing; see engine/cuda_graphs.py). `num_sms` overrides the device's
        SM count in the Triton kernel's split choice (tests on CPU)."""
        a, bs = self.arch, self.block_size
        max_len = min(self.config.max_model_len or a.max_position_embeddings,
                      a.max_position_embeddings)
        max_blocks = -(-max_len // bs)
        triton_launch = None
        if self.ops.name == "triton":
            sms = num_sms or (torch.cuda.get_device_properties(self.device).multi_processor_count
                              if self.device.type == "cuda" else 1)
            triton_launch = (a.num_heads, a.num_kv_heads, a.head_dim, max_blocks * bs, sms)
        plan_hook = self._torch_decode_plan if self.ops.name == "torch" else None

        def forward(ids: torch.Tensor, positions: torch.Tensor,
                    meta: AttentionMetadata) -> torch.Tensor:
            return self.model(ids, positions, self.kv_caches, meta, self.ops, None)

        return DecodeGraphs(forward, device=self.device,
                            sizes=capture_sizes(self.config.max_num_seqs), block_size=bs,
                            max_blocks_per_seq=max_blocks, capture=capture,
                            triton_launch=triton_launch, plan_hook=plan_hook)

    def _torch_decode_plan(self, meta: AttentionMetadata) -> None:
        from splitserve.kernels.reference import plan_decode

        meta.decode_plan = plan_decode(meta.decode_block_tables, meta.decode_context_lens,
                                       self.block_size, self.num_blocks)

    # ---- one step ------------------------------------------------------------------------
    def prepare(self, scheduled: list[ScheduledSequence]) -> StepBatch:
        """Order tokens decode-first and build ids, positions, slot mapping, block tables.
        Every index tensor of the step reaches the device in two copies (int64, int32)."""
        bs = self.block_size
        singles = [s for s in scheduled if s.num_tokens == 1]
        chunks = [s for s in scheduled if s.num_tokens > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampling: list[ScheduledSequence] = []
        spans: list[tuple[int, int, int, list[int]]] = []  # row, tokens, context, block ids
        for item in singles + chunks:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_tokens
            row = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if item.num_tokens > 1:
                spans.append((row, item.num_tokens, end, table[: -(-end // bs)]))
            if item.completes:
                sample_rows.append(row + item.num_tokens - 1)
                sampling.append(item)
        width = max((len(s.seq.block_table) for s in singles), default=1)
        tables = [t for s in singles
                  for t in (s.seq.block_table + [0] * (width - len(s.seq.block_table)))]
        lens = [s.seq.num_computed_tokens + 1 for s in singles]
        ids_t, positions_t, slots_t, rows_t, *span_ids = self._upload(
            [input_ids, positions, slots, sample_rows, *(span[3] for span in spans)],
            torch.int64)
        lens_t, tables_t = self._upload([lens or [1], tables or [0]], torch.int32)
        meta = AttentionMetadata(
            slot_mapping=slots_t,
            num_decode_tokens=len(singles),
            decode_block_tables=tables_t.view(max(1, len(singles)), width),
            decode_context_lens=lens_t,
            prefills=[PrefillSpan(row, n, context, block_ids)
                      for (row, n, context, _), block_ids in zip(spans, span_ids, strict=True)],
        )
        if singles and self.ops.name == "torch":
            self._torch_decode_plan(meta)
        return StepBatch(input_ids=ids_t, positions=positions_t, meta=meta,
                         sample_rows=rows_t, sampling=sampling)

    def _upload(self, groups: list[list[int]], dtype: torch.dtype) -> list[torch.Tensor]:
        """Host lists -> one tensor each on the device, through a single copy (from pinned
        memory, not blocking the host, on CUDA); the tensors are views of one buffer."""
        flat = torch.tensor([x for group in groups for x in group], dtype=dtype)
        if self.device.type != "cpu":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        return list(flat.split([len(group) for group in groups]))

    @torch.inference_mode()
    def execute(
        self,
        scheduled: list[ScheduledSequence],
        generator_of: Callable[[Sequence], torch.Generator | None],
        layer_hook: LayerHook | None = None,
        token_masks: StepMasks | None = None,
    ) -> tuple[list[ScheduledSequence], SampleResult]:
        """Run one step; returns the sequences that sampled and their samples, in order.
        `token_masks`: the grammar masks of the constrained requests (engine.grammar),
        waited for only once the logits exist."""
        sample_rows: torch.Tensor | None
        if self.graphs is not None and layer_hook is None and self.graphs.can_run(scheduled):
            hidden, rows, sampling = self.graphs.run(scheduled)
            sample_rows = (None if len(rows) == hidden.shape[0] else
                           torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True))
        else:
            batch = self.prepare(scheduled)
            hidden = self.model(
                batch.input_ids, batch.positions, self.kv_caches, batch.meta, self.ops, layer_hook
            )
            sampling, sample_rows = batch.sampling, batch.sample_rows
        if not sampling:
            return [], SampleResult([], [])
        logits = self.model.compute_logits(
            hidden if sample_rows is None else hidden.index_select(0, sample_rows))
        params = [s.seq.params for s in sampling]
        generators = [generator_of(s.seq) for s in sampling]
        histories = [TokenHistory(s.seq.token_ids, s.seq.penalized_output_ids)
                     if p.adjusts_logits else None
                     for s, p in zip(sampling, params, strict=True)]
        mask = (token_masks.for_batch([s.seq.request_id for s in sampling])
                if token_masks is not None else None)
        return sampling, sample(logits, params, generators, histories, mask)
