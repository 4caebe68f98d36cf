"""Fixtures of the OpenAI API tests: a module defines its own `deployment` (router and
worker settings differ); `client` and `model` are derived from it here."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.service.deployment import Deployment


@pytest.fixture(scope="module")
def client(deployment: Deployment) -> Iterator[openai.OpenAI]:
    """The official client on the deployment's HTTP API (no retries: every error shows)."""
    with openai.OpenAI(base_url=f"http://{deployment.router.http_address}/v1", api_key="none",
                       max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(deployment: Deployment) -> str:
    return deployment.router.model.model_id
