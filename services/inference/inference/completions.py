"""
Chat and text completions: from an OpenAI request to submissions on a model's scheduler, and from
the scheduler's events to OpenAI's response objects, whole or as server-sent events.
"""

import asyncio
import codecs
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from inference.chat_template import to_conversation
from inference.pool import ServedModel
from inference.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, SamplingFields
from inference.scheduler import (
    Failure,
    Output,
    PromptScores,
    QueueFull,
    SamplingParams,
    Submission,
    TokenScore,
    Unloaded,
)
from trainer.chat_format import ConversationError, render_conversation, render_for_completion
from trainer.tokenizer import Tokenizer

DISCONNECT_POLL_SECONDS = 0.5  # a waiting non-streaming request checks its client this often


# -- prompts and limits --------------------------------------------------------------------


def chat_prompt(
    served: ServedModel, request: ChatCompletionRequest, max_messages: int, for_reply: bool = True
) -> list[int]:
    """The conversation's tokens, primed for the assistant's reply (or all of it, as it is)."""
    if len(request.messages) > max_messages:
        raise OpenAIError(400, f"at most {max_messages} messages per request", param="messages")
    conversation = to_conversation(request.messages)
    try:
        if for_reply:
            return render_for_completion(served.tokenizer, conversation)
        return render_conversation(served.tokenizer, conversation, max_tokens=10**9)[0]
    except ConversationError as error:
        raise OpenAIError(400, str(error), param="messages") from error


def text_prompt(served: ServedModel, prompt: str | list[int], add_bos: bool = True) -> list[int]:
    """A string is encoded after <|bos|> (documents start with it in training); ids are taken as they are."""
    if isinstance(prompt, str):
        return served.tokenizer.encode(prompt, prepend=served.tokenizer.bos_token_id if add_bos else None)
    vocab = served.tokenizer.vocab_size
    if any(not 0 <= t < vocab for t in prompt):
        raise OpenAIError(400, f"token ids must be in [0, {vocab})", param="prompt")
    return prompt


def room_for(
    served: ServedModel, prompt: list[int], max_tokens: int | None, param: str, echo: bool = False
) -> int:
    """max_tokens clamped to what the context (and the server's KV cache) leaves after the prompt; 400
    when the prompt fills it."""
    limit = served.context
    if len(prompt) > limit or (len(prompt) == limit and not echo):
        raise OpenAIError(
            400,
            f"This model's maximum context length is {limit} tokens; the prompt has {len(prompt)} tokens "
            f"and leaves no room for a reply.",
            param=param,
            code="context_length_exceeded",
        )
    if len(prompt) + 1 > served.kv_positions:
        raise OpenAIError(
            400,
            f"This server's KV cache holds {served.kv_positions} positions (INFERENCE_KV_CACHE_TOKENS); the "
            f"prompt has {len(prompt)} tokens and leaves no room for a reply.",
            param=param,
            code="context_length_exceeded",
        )
    room = min(limit, served.kv_positions) - len(prompt)
    return room if max_tokens is None else min(max_tokens, room)


def sampling_params(
    request: SamplingFields, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p if request.top_p < 1 else None,
        top_k=request.top_k_or_none(),
        seed=request.seed,
        stop=request.stop_strings(),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


# -- running a request ---------------------------------------------------------------------


@dataclass
class Job:
    """Submissions whose events all arrive on one queue (several prompts, each with n samples)."""

    submissions: list[Submission] = field(default_factory=list)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    @property
    def sequences(self) -> int:
        return sum(s.n for s in self.submissions)

    def cancel(self) -> None:
        for submission in self.submissions:
            submission.cancelled = True


def submit(served: ServedModel, prompts: list[tuple[list[int], SamplingParams]], n: int) -> Job:
    if n > served.scheduler.max_batch_size:
        raise OpenAIError(
            400, f"n may be at most {served.scheduler.max_batch_size} on this server", param="n"
        )
    if len(prompts) > max(served.scheduler.max_waiting, 1):
        raise OpenAIError(
            400, f"at most {served.scheduler.max_waiting} prompts per request on this server", param="prompt"
        )
    job = Job()
    job.submissions = [
        Submission(prompt, params, n, job.events, first_index=i * n)
        for i, (prompt, params) in enumerate(prompts)
    ]
    try:
        served.scheduler.submit(job.submissions)
    except Unloaded as error:
        raise OpenAIError(
            503, "the model was just unloaded; retry", type="server_error", headers={"Retry-After": "1"}
        ) from error
    except QueueFull as error:
        raise OpenAIError(
            429,
            f"The server is busy: {error}. Retry shortly.",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from error
    return job


def merged(batch: list[Output | PromptScores]) -> list[Output | PromptScores]:
    """The events as they queued up, with each sequence's outputs joined into one (text and tokens in
    order, the last one's finish reason): a client that reads slower than the model gets fewer,
    larger chunks instead of falling further behind."""
    result: list[Output | PromptScores] = []
    at: dict[int, int] = {}  # sequence index → its output's place in result
    for event in batch:
        if isinstance(event, Output) and event.index in at:
            earlier = result[at[event.index]]
            result[at[event.index]] = Output(
                event.index, earlier.text + event.text, earlier.tokens + event.tokens, event.finish_reason
            )
            continue
        if isinstance(event, Output):
            at[event.index] = len(result)
        result.append(event)
    return result


async def events(job: Job, request: Request) -> AsyncIterator[Output | PromptScores]:
    """The job's events until every sequence has finished, merged where several have queued up; the
    job is cancelled if the client leaves (this generator is closed) or is found gone while nothing
    arrives."""
    remaining = job.sequences
    try:
        while remaining:
            try:
                async with asyncio.timeout(DISCONNECT_POLL_SECONDS):
                    batch = [await job.events.get()]
            except TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            while not job.events.empty():
                batch.append(job.events.get_nowait())
            failure = next((e for e in batch if isinstance(e, Failure)), None)
            if failure is not None:
                kind = "server_error" if failure.status >= 500 else "invalid_request_error"
                raise OpenAIError(failure.status, failure.message, type=kind)
            for event in merged(batch):
                if isinstance(event, Output) and event.finish_reason is not None:
                    remaining -= 1
                yield event
    finally:
        job.cancel()  # a no-op for finished sequences


async def collect(
    job: Job, request: Request
) -> tuple[list[str], list[list[TokenScore]], list[str | None], dict[int, list[TokenScore | None]]]:
    """A whole job's results, per choice index: text, token scores and finish reason; and the prompt
    scores of each submission (by its first index), for non-streaming responses."""
    count = job.sequences
    texts: list[list[str]] = [[] for _ in range(count)]
    scores: list[list[TokenScore]] = [[] for _ in range(count)]
    reasons: list[str | None] = [None] * count
    prompt_scores: dict[int, list[TokenScore | None]] = {}
    async for event in events(job, request):
        if isinstance(event, PromptScores):
            prompt_scores[event.first_index] = event.scores
            continue
        texts[event.index].append(event.text)
        scores[event.index] += event.tokens
        reasons[event.index] = event.finish_reason or reasons[event.index]
    return ["".join(t) for t in texts], scores, reasons, prompt_scores


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")


class TextOffsets:
    """Where each token of a choice starts in its text, in characters: the index of the character
    that holds the token's first byte. Decoding each token alone would count a U+FFFD for every piece
    of a character split across tokens, and the offsets after it would drift off the text."""

    def __init__(self, start: int) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.position = start  # characters the decoder has given so far

    def advance(self, tokenizer: Tokenizer, tokens: list[int]) -> list[int]:
        offsets = []
        for token in tokens:
            data = tokenizer.decode_bytes([token])
            held, _ = self.decoder.getstate()  # the start of a character, waiting for the rest
            # what of those bytes this token does not continue stands before it, as U+FFFDs: every
            # character of them and its first byte but the last, which holds that byte
            before = len((held + data[:1]).decode("utf-8", errors="replace")) - 1 if data else 0
            offsets.append(self.position + before)
            self.position += len(self.decoder.decode(data))
        return offsets


# -- chat completions ------------------------------------------------------------------------


def chat_logprobs(tokenizer: Tokenizer, scores: list[TokenScore]) -> list[dict]:
    def entry(token: int, logprob: float) -> dict:
        raw = tokenizer.decode_bytes([token])
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]} for s in scores]


class ChatCompletion:
    def __init__(self, served: ServedModel, request: ChatCompletionRequest, max_messages: int) -> None:
        self.served, self.request = served, request
        self.prompt = chat_prompt(served, request, max_messages)
        max_tokens = room_for(
            served, self.prompt, request.max_completion_tokens or request.max_tokens, "messages"
        )
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        self.params = sampling_params(request, max_tokens, logprobs)
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def header(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.served.checkpoint.id}

    async def response(self, http_request: Request) -> dict:
        n = self.request.n
        texts, scores, reasons, _ = await collect(
            submit(self.served, [(self.prompt, self.params)], n), http_request
        )
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": texts[i]},
                "logprobs": {"content": chat_logprobs(self.served.tokenizer, scores[i])}
                if self.request.logprobs
                else None,
                "finish_reason": reasons[i],
            }
            for i in range(n)
        ]
        completion = sum(len(s) for s in scores)
        return {
            **self.header(),
            "object": "chat.completion",
            "choices": choices,
            "usage": usage(len(self.prompt), completion),
        }

    async def stream(self, http_request: Request) -> AsyncIterator[str]:
        job = submit(self.served, [(self.prompt, self.params)], self.request.n)
        return self.chunks(job, http_request)

    async def chunks(self, job: Job, http_request: Request) -> AsyncIterator[str]:
        include_usage = self.request.include_usage
        base = {**self.header(), "object": "chat.completion.chunk"}
        extra = {"usage": None} if include_usage else {}

        def chunk(index: int, delta: dict, logprobs: list[TokenScore] | None, reason: str | None) -> str:
            lp = {"content": chat_logprobs(self.served.tokenizer, logprobs)} if logprobs is not None else None
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
            return sse({**base, "choices": [choice], **extra})

        for index in range(self.request.n):
            yield chunk(index, {"role": "assistant", "content": ""}, None, None)
        completion = 0
        try:
            async for event in events(job, http_request):
                completion += len(event.tokens)
                logprobs = event.tokens if self.request.logprobs else None
                if event.text or event.tokens:
                    yield chunk(event.index, {"content": event.text}, logprobs, None)
                if event.finish_reason:
                    yield chunk(event.index, {}, None, event.finish_reason)
        except OpenAIError as error:
            yield sse(error.body())
            return
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(len(self.prompt), completion)})
        yield sse("[DONE]")


# -- text completions (the legacy API evaluation harnesses use) --------------------------------


class TextCompletion:
    def __init__(self, served: ServedModel, request: CompletionRequest) -> None:
        self.served, self.request = served, request
        self.prompts = [text_prompt(served, p) for p in request.prompts()]
        top = request.logprobs
        self.params = [  # an echoed prompt is always scored: its text comes back with its scores
            sampling_params(
                request,
                room_for(served, prompt, request.max_tokens, "prompt", echo=request.echo),
                top,
                (top or 0) if request.echo else None,
            )
            for prompt in self.prompts
        ]
        if request.max_tokens == 0 and not request.echo:
            raise OpenAIError(400, "max_tokens may be 0 only with echo", param="max_tokens")
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def header(self) -> dict:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.served.checkpoint.id,
        }

    def legacy_logprobs(
        self, scores: list[TokenScore | None], tokens: list[int], offsets: TextOffsets
    ) -> dict:
        """OpenAI's legacy layout: parallel lists, text offsets counted from the choice's text start."""
        tokenizer = self.served.tokenizer
        top = [None if s is None else {token_text(tokenizer, t): lp for t, lp in s.top} for s in scores]
        return {
            "tokens": [token_text(tokenizer, t) for t in tokens],
            "token_logprobs": [None if s is None else s.logprob for s in scores],
            "top_logprobs": top,
            "text_offset": offsets.advance(tokenizer, tokens),
        }

    def submit(self) -> Job:
        return submit(self.served, list(zip(self.prompts, self.params, strict=True)), self.request.n)

    async def response(self, http_request: Request) -> dict:
        n = self.request.n
        count = len(self.prompts) * n
        texts, scores, reasons, prompt_scores = await collect(self.submit(), http_request)
        choices = []
        for i in range(count):
            prompt = self.prompts[i // n]
            echo = self.served.tokenizer.decode(prompt) if self.request.echo else ""
            logprobs = None
            if self.request.logprobs is not None:
                tokens = [s.token for s in scores[i]]
                logprobs = self.legacy_logprobs(scores[i], tokens, TextOffsets(len(echo)))
                if self.request.echo:
                    echoed = self.legacy_logprobs(prompt_scores[(i // n) * n], prompt, TextOffsets(0))
                    logprobs = {key: echoed[key] + logprobs[key] for key in logprobs}
            choices.append(
                {
                    "text": echo + texts[i],
                    "index": i,
                    "logprobs": logprobs,
                    "finish_reason": reasons[i],
                }
            )
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion = sum(len(s) for s in scores)
        return {**self.header(), "choices": choices, "usage": usage(prompt_tokens, completion)}

    async def stream(self, http_request: Request) -> AsyncIterator[str]:
        return self.chunks(self.submit(), http_request)

    async def chunks(self, job: Job, http_request: Request) -> AsyncIterator[str]:
        n, extra = self.request.n, {"usage": None} if self.request.include_usage else {}
        offsets: dict[int, TextOffsets] = {}  # per choice, carried from chunk to chunk

        def chunk(index: int, text: str, logprobs: dict | None, reason: str | None) -> str:
            choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}
            return sse({**self.header(), "choices": [choice], **extra})

        completion = 0
        try:
            async for event in events(job, http_request):
                if isinstance(event, PromptScores):  # echo: the prompt first, scored
                    prompt = self.prompts[event.first_index // n]
                    text = self.served.tokenizer.decode(prompt)
                    for index in range(event.first_index, event.first_index + n):
                        offsets[index] = TextOffsets(len(text))
                        scored = (
                            self.legacy_logprobs(event.scores, prompt, TextOffsets(0))
                            if self.request.logprobs is not None
                            else None
                        )
                        yield chunk(index, text, scored, None)
                    continue
                completion += len(event.tokens)
                logprobs = None
                if self.request.logprobs is not None:
                    choice_offsets = offsets.setdefault(event.index, TextOffsets(0))
                    tokens = [s.token for s in event.tokens]
                    logprobs = self.legacy_logprobs(event.tokens, tokens, choice_offsets)
                yield chunk(event.index, event.text, logprobs, event.finish_reason)
        except OpenAIError as error:
            yield sse(error.body())
            return
        if self.request.include_usage:
            prompt_tokens = sum(len(p) for p in self.prompts)
            yield sse({**self.header(), "choices": [], "usage": usage(prompt_tokens, completion)})
        yield sse("[DONE]")
