"""Offline inference: `LLM(model=...).generate(prompts, params)`.

    from splitserve import LLM, SamplingParams
    llm = LLM(model="smollm2-135m")
    outputs = llm.chat([[{"role": "user", "content": "Hi!"}]], SamplingParams(temperature=0))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from splitserve.common.outputs import RequestOutput
from splitserve.common.sampling_params import SamplingParams
from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine

Prompt = str | list[int]
Conversation = list[dict[str, str]]


class LLM:
    def __init__(self, model: str = "smollm2-135m", **config: Any):
        self.engine = LLMEngine(EngineConfig(model=model, **config))
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of `prompts`.

        Strings are tokenized without a chat template; lists of ints are token ids. All
        prompts are validated before any is queued, so a bad one queues nothing.
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompt_list = list(prompts)  # type: ignore[arg-type]
        param_list = self._params_for(params, len(prompt_list))
        token_lists = [self._tokens(p) for p in prompt_list]
        for tokens, p in zip(token_lists, param_list, strict=True):
            self.engine.validate_prompt(tokens, p)
        return self._run(token_lists, param_list, use_tqdm)

    def chat(
        self,
        conversations: Conversation | Sequence[Conversation],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template (with the assistant prompt) and generate."""
        batch = cast("Sequence[Conversation]", [conversations]
                     if conversations and isinstance(conversations[0], dict)
                     else conversations)  # one conversation, or several
        prompts = [self.tokenizer.apply_chat_template(list(c)) for c in batch]
        return self.generate(prompts, params, use_tqdm)

    def _tokens(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    @staticmethod
    def _params_for(
        params: SamplingParams | Sequence[SamplingParams] | None, count: int
    ) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        param_list = list(params)
        if len(param_list) != count:
            raise ValueError(f"got {len(param_list)} SamplingParams for {count} prompts")
        return param_list

    def _run(
        self, token_lists: list[list[int]], params: list[SamplingParams], use_tqdm: bool | None
    ) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        order: list[str] = []
        for tokens, p in zip(token_lists, params, strict=True):
            self._counter += 1
            request_id = f"llm-{self._counter}"
            self.engine.add_request(tokens, p, request_id)
            order.append(request_id)
            results[request_id] = RequestOutput(
                request_id, tokens, [], "", None, 0, [] if p.logprobs is not None else None
            )
        bar = _progress_bar(len(order), use_tqdm)
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    result = results[out.request_id]
                    result.token_ids.extend(out.new_token_ids)
                    result.text += out.new_text
                    result.num_cached_tokens = max(result.num_cached_tokens, out.num_cached_tokens)
                    if result.logprobs is not None:
                        result.logprobs.extend(out.new_logprobs)
                    if out.finished:
                        result.finish_reason = out.finish_reason
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for request_id in order:  # leave the engine clean (no blocks held) on Ctrl-C
                self.engine.abort(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[r] for r in order]


def _progress_bar(total: int, use_tqdm: bool | None) -> Any:
    if use_tqdm is False or (use_tqdm is None and total < 64):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate", unit="req")
