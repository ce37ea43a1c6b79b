"""Chunked prefill: prompts computed a chunk per step give the replies and prompt scores of a whole
prefill, and a running stream keeps getting tokens while a long prompt is prefilled."""

import asyncio

import pytest
import torch

from inference.metrics import Metrics
from inference.prefill import Prefill
from inference.scheduler import Failure, Output, PromptScores, SamplingParams, Scheduler, Submission
from tests.inference.conftest import random_prompt, tiny_tokenizer
from trainer.engine import Engine
from trainer.gpt import GPT


async def collect(scheduler: Scheduler, submission: Submission) -> list[int]:
    scheduler.submit([submission])
    tokens = []
    while True:
        event = await submission.events.get()
        assert not isinstance(event, Failure), event.message
        if isinstance(event, Output):
            tokens += [score.token for score in event.tokens]
            if event.finish_reason:
                return tokens


def test_prompts_prefilled_in_chunks_reply_as_the_engine_does(model: GPT) -> None:
    engine = Engine(model, tiny_tokenizer())
    # 1, 3 and 6 chunks of 16, in one group
    prompts = [random_prompt(5, 1), random_prompt(40, 2), random_prompt(90, 3)]
    scheduler = Scheduler(engine, 4, 4, Metrics(), "tiny", chunk_tokens=48)

    async def together() -> list[list[int]]:
        params = SamplingParams(max_tokens=12, temperature=0)
        return await asyncio.gather(*(collect(scheduler, Submission(p, params)) for p in prompts))

    try:
        replies = asyncio.run(together())
    finally:
        scheduler.close()
    for p, reply in zip(prompts, replies, strict=True):
        (expected,) = engine.complete(p, max_tokens=12, temperature=0)
        assert reply == [t.id for t in expected]


def test_a_prompt_scored_in_chunks_gets_the_scores_of_one_forward(model: GPT) -> None:
    ids = random_prompt(50, 4)
    scheduler = Scheduler(Engine(model, tiny_tokenizer()), 4, 4, Metrics(), "tiny", chunk_tokens=16)

    async def scores() -> list:
        submission = Submission(ids, SamplingParams(max_tokens=0, prompt_logprobs=0))
        scheduler.submit([submission])
        event = await submission.events.get()
        assert isinstance(event, PromptScores), event
        return event.scores

    try:
        scored = asyncio.run(scores())
    finally:
        scheduler.close()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids]))[0, :-1], dim=-1)
    expected = logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert scored[0] is None
    assert [s.logprob for s in scored[1:]] == pytest.approx(expected.tolist(), abs=1e-4)


def test_a_running_stream_keeps_getting_tokens_while_a_long_prompt_is_prefilled(model: GPT) -> None:
    """Without chunks the long prompt's prefill is one forward: the stream would wait it out."""
    scheduler = Scheduler(Engine(model, tiny_tokenizer()), 4, 4, Metrics(), "tiny", chunk_tokens=8)
    long_prompt = random_prompt(120, 5)  # 15 chunks

    async def stream_beside_long_prompt() -> int:
        events: asyncio.Queue = asyncio.Queue()  # both requests' events, in the order they were made
        running = Submission(
            random_prompt(4, 6), SamplingParams(max_tokens=100, temperature=0), events=events
        )
        scheduler.submit([running])
        while not isinstance(await events.get(), Output):  # the stream is running
            pass
        long = Submission(
            long_prompt, SamplingParams(max_tokens=1, temperature=0), events=events, first_index=1
        )
        scheduler.submit([long])
        tokens_meanwhile = 0
        while True:
            event = await events.get()
            assert isinstance(event, Output), event
            if event.index == 1:
                scheduler.close()  # while this loop still takes the running stream's failure
                return tokens_meanwhile
            tokens_meanwhile += len(event.tokens)

    try:
        tokens_meanwhile = asyncio.run(stream_beside_long_prompt())
    finally:
        scheduler.close()
    assert tokens_meanwhile >= 120 // 8 - 1


def test_a_prefill_that_cannot_start_fails_its_requests_and_the_next_ones_are_served(
    model: GPT, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its requests were already out of the queue when the prefill failed to start (a prefix-cache copy
    that runs out of device memory, say): they get the error instead of waiting forever, and the
    scheduler goes on."""
    real_start, calls = Prefill.start, []

    def start(*args, **options) -> Prefill:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        return real_start(*args, **options)

    monkeypatch.setattr(Prefill, "start", start)
    scheduler = Scheduler(Engine(model, tiny_tokenizer()), 4, 4, Metrics(), "tiny")

    async def first_then_second() -> tuple[Failure, list[int]]:
        failed = Submission(random_prompt(9, 1), SamplingParams(max_tokens=4, temperature=0))
        scheduler.submit([failed])
        failure = await asyncio.wait_for(failed.events.get(), 30)
        served = Submission(random_prompt(9, 2), SamplingParams(max_tokens=4, temperature=0))
        return failure, await asyncio.wait_for(collect(scheduler, served), 30)

    try:
        failure, tokens = asyncio.run(first_then_second())
    finally:
        scheduler.close()
    assert isinstance(failure, Failure) and "CUDA out of memory" in failure.message
    assert len(tokens) == 4
