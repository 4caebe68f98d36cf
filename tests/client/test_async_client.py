"""AsyncClient (grpc.aio) against the scripted SplitServe server over real gRPC on loopback."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from splitserve.client import (
    AsyncClient,
    Chunk,
    Completion,
    DeadlineExceeded,
    InvalidRequest,
    ModelInfo,
    Overloaded,
    Unavailable,
)
from tests.client.conftest import (
    EXPECTED_TIMINGS,
    EXPECTED_USAGE,
    Script,
    Served,
    hello_partial,
    spy_on_calls,
)


def run(router: Served, body: Callable[[AsyncClient], Awaitable[Any]], **kwargs: Any) -> Any:
    """Run body(client) in a fresh event loop with a client made inside it."""
    kwargs.setdefault("retry_backoff_s", 0.01)

    async def main() -> Any:
        async with AsyncClient(router.address, **kwargs) as client:
            return await body(client)

    return asyncio.run(main())


def test_generate_and_chat_assemble_completions(router: Served) -> None:
    async def body(client: AsyncClient) -> tuple[Completion, Completion]:
        return (await client.generate("Hi", max_tokens=4, request_id="a1"),
                await client.chat([{"role": "user", "content": "Hi"}], temperature=0.0))

    plain, chat = run(router, body, token="tok")
    assert plain == Completion(request_id="a1", text="Hello world", token_ids=[11, 12, 13, 14],
                               finish_reason="stop", usage=EXPECTED_USAGE,
                               timings=EXPECTED_TIMINGS)
    assert chat.text == "Hello world" and chat.request_id == "router-2"
    first, second = router.servicer.requests
    assert first.prompt == "Hi" and first.sampling_params.max_tokens == 4
    assert [(m.role, m.content) for m in second.messages.messages] == [("user", "Hi")]
    assert second.sampling_params.temperature == 0.0
    assert [m["authorization"] for m in router.servicer.metadata] == ["Bearer tok"] * 2


def test_stream_yields_chunks_in_order(router: Served) -> None:
    async def body(client: AsyncClient) -> list[Chunk]:
        return [chunk async for chunk in client.stream([7, 8], request_id="s")]

    chunks = run(router, body)
    assert chunks == [
        Chunk([11, 12], "Hel", request_id="s"),
        Chunk([13], "lo", request_id="s"),
        Chunk([14], " world", request_id="s"),
        Chunk([], "", "stop", EXPECTED_USAGE, EXPECTED_TIMINGS, request_id="s"),
    ]
    assert list(router.servicer.requests[0].token_ids.token_ids) == [7, 8]


@pytest.mark.parametrize("how", ["break", "aclose", "task_cancel"])
def test_leaving_stream_early_cancels_rpc(router: Served, how: str) -> None:
    router.servicer.script = Script(chunks=hello_partial(), hold=True)

    async def body(client: AsyncClient) -> grpc.StatusCode | None:
        calls = spy_on_calls(client)
        if how == "break":
            async for chunk in client.stream("Hi"):
                assert chunk.token_ids == [11, 12]
                break
            gc.collect()
        elif how == "aclose":
            stream = client.stream("Hi")
            await stream.__anext__()
            await stream.aclose()
        else:
            seen = asyncio.Event()

            async def consume() -> None:
                async for _ in client.stream("Hi"):
                    seen.set()

            task = asyncio.create_task(consume())
            await seen.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        # Let the loop run the generator's finalizer; then the call must be cancelled.
        for _ in range(100):
            if calls[0].done():
                return await calls[0].code()
            await asyncio.sleep(0.01)
        calls[0].cancel()  # fail, not hang, when the SDK left the call open
        return None

    assert run(router, body) == grpc.StatusCode.CANCELLED
    assert router.servicer.cancelled.wait(1.0), "server did not see the cancellation"


def test_timeout_raises_deadline_exceeded(router: Served) -> None:
    router.servicer.script = Script(chunks=[], hold=True)

    async def body(client: AsyncClient) -> None:
        with pytest.raises(DeadlineExceeded):
            await client.generate("Hi", timeout=0.3)

    run(router, body)
    run(router, body, timeout=0.3)
    assert router.servicer.attempts == 2


def test_status_codes_map_to_errors(router: Served) -> None:
    async def body(client: AsyncClient) -> None:
        router.servicer.script = Script(fail_first=100, fail_code=grpc.StatusCode.INVALID_ARGUMENT,
                                        fail_message="unknown model 'x'")
        with pytest.raises(InvalidRequest, match="unknown model 'x'"):
            await client.generate("Hi", model="x")
        router.servicer.script = Script(fail_first=100,
                                        fail_code=grpc.StatusCode.RESOURCE_EXHAUSTED)
        with pytest.raises(Overloaded):
            await client.generate("Hi")

    run(router, body)
    assert router.servicer.attempts == 2  # neither is retried


def test_unavailable_retried_only_before_first_chunk(router: Served) -> None:
    async def body(client: AsyncClient) -> Completion:
        return await client.generate("Hi")

    router.servicer.script = Script(fail_first=2)
    assert run(router, body, max_retries=3).text == "Hello world"
    assert router.servicer.attempts == 3

    router.servicer.requests.clear()
    router.servicer.script = Script(abort_after=1)

    async def body_after_chunk(client: AsyncClient) -> list[str]:
        received = []
        with pytest.raises(Unavailable):
            async for chunk in client.stream("Hi"):
                received.append(chunk.text)
        return received

    assert run(router, body_after_chunk, max_retries=3) == ["Hel"]
    assert router.servicer.attempts == 1


def test_invalid_sampling_raises_before_any_rpc(router: Served) -> None:
    async def body(client: AsyncClient) -> None:
        with pytest.raises(ValueError):
            await client.generate("Hi", top_p=1.5)
        with pytest.raises(ValueError):
            client.stream("Hi", logprobs=-1)
        with pytest.raises(TypeError):
            await client.chat([{"role": "user", "content": "Hi"}], n=2)

    run(router, body)
    assert router.servicer.attempts == 0


def test_list_models(router: Served) -> None:
    router.servicer.script = Script(fail_first=1)

    async def body(client: AsyncClient) -> list[ModelInfo]:
        return await client.list_models(timeout=5)

    assert run(router, body) == [ModelInfo("smollm2-135m", 2048, 16, 2, 1)]
    assert router.servicer.list_models_calls == 2
