"""What the router knows about the served model: its id, tokenizer and context length.

Resolving the default alias or a .gguf path may need a one-time conversion to safetensors,
which imports torch; the router must not, so a missing conversion runs in a child process
(the workers may be doing the same: engine.model_files locks the cache entry).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from splitserve.engine.model_files import (
    DEFAULT_MODEL,
    gguf_cache_dir,
    load_config,
    model_name,
    resolve_model,
    smollm2_gguf_path,
    validate_model_dir,
)
from splitserve.engine.tokenizer import Tokenizer

_CONVERT_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class ServedModel:
    """The model a router serves. `model_id` is what workers register as WorkerInfo.model."""

    model_id: str
    model_dir: Path
    tokenizer: Tokenizer
    max_model_len: int  # longest prompt + output, in tokens
    vocab_size: int  # token ids must be < vocab_size

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.tokenizer.eos_token_ids


def _gguf_source(model: str) -> Path | None:
    """The GGUF file behind an alias or an existing .gguf path; None for anything else."""
    text = model.strip()
    if text.lower() == DEFAULT_MODEL:
        return smollm2_gguf_path()
    path = Path(text).expanduser()
    return path if path.suffix.lower() == ".gguf" and path.is_file() else None


def _converted_dir(gguf: Path) -> Path | None:
    """The conversion cache entry of a GGUF file when complete, else None."""
    cache = gguf_cache_dir(gguf)
    try:
        validate_model_dir(cache)
    except (ValueError, OSError):
        return None
    return cache


def resolve_model_dir(model: str) -> Path:
    """engine.model_files.resolve_model without importing torch into this process."""
    gguf = _gguf_source(model)
    if gguf is None:
        return resolve_model(model)  # a model directory (validated in place) or an error
    cached = _converted_dir(gguf)
    if cached is not None:
        return cached
    code = "import sys; from splitserve.engine.model_files import resolve_model; print(resolve_model(sys.argv[1]))"
    result = subprocess.run(
        [sys.executable, "-c", code, model],
        capture_output=True,
        text=True,
        timeout=_CONVERT_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise ValueError(f"cannot resolve model {model!r}: {result.stderr.strip()[-2000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def load_served_model(model: str, max_model_len: int | None = None,
                      chat_template: str | None = None) -> ServedModel:
    """Tokenizer and limits of `model`; `max_model_len` caps the model's own context;
    `chat_template` (a file) replaces the model's chat template."""
    model_dir = resolve_model_dir(model)
    config = load_config(model_dir)
    context = int(config["max_position_embeddings"])
    if max_model_len is not None:
        context = min(context, max_model_len)
    tokenizer = Tokenizer.from_dir(model_dir)
    if chat_template is not None:
        tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
    # The embedding size, which the workers check token ids against too.
    vocab = int(config["vocab_size"])
    return ServedModel(model_name(model), model_dir, tokenizer, context, vocab)
