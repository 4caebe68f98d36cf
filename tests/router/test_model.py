"""Resolving the served model without importing torch into the router process."""

from __future__ import annotations

from pathlib import Path

import pytest

import splitserve.router.model as router_model
from splitserve.engine.model_files import smollm2_gguf_path
from splitserve.router.model import resolve_model_dir


def test_a_converted_alias_resolves_from_the_cache(smollm2_dir: Path) -> None:
    assert router_model._gguf_source("smollm2-135m") == smollm2_gguf_path()
    assert router_model._gguf_source(str(smollm2_dir)) is None  # a directory: no conversion
    assert router_model._converted_dir(smollm2_gguf_path()) == smollm2_dir
    assert resolve_model_dir("smollm2-135m") == smollm2_dir
    assert resolve_model_dir(str(smollm2_dir)) == smollm2_dir


def test_a_missing_conversion_runs_in_a_child_process(smollm2_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # As if the cache were cold: the child process resolves (and would convert) the model.
    monkeypatch.setattr(router_model, "_converted_dir", lambda gguf: None)
    assert resolve_model_dir("smollm2-135m") == smollm2_dir


def test_a_failed_conversion_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file")
    monkeypatch.setattr(router_model, "_converted_dir", lambda gguf: None)
    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="cannot resolve model"):
        resolve_model_dir(str(bogus))


def test_unknown_models_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        resolve_model_dir(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="not found"):
        resolve_model_dir(str(tmp_path / "missing.gguf"))
