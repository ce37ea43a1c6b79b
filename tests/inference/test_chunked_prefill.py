"""Chunked prefill: prompts computed a chunk per step give the replies and prompt scores of a whole
prefill, and a running stream keeps getting tokens while a long prompt is prefilled."""

import asyncio

import pytest
import torch

from inference.metrics import Metrics
from inference.paged_cache import PagedKVCache
from inference.prefill import Prefill
from inference.scheduler import Failure, Output, PromptScores, SamplingParams, Scheduler, Submission
from tests.inference.conftest import random_prompt, tiny_tokenizer
from tests.inference.test_paged_cache import serve
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
    """Without chunks the long prompt's prefill is one forward: the stream would wait it out. The test
    runs the scheduler's steps itself, holding its lock, so a slow machine cannot end the stream first."""
    scheduler = Scheduler(Engine(model, tiny_tokenizer()), 4, 4, Metrics(), "tiny", chunk_tokens=8)
    long_prompt = random_prompt(120, 5)  # 15 chunks

    async def stream_beside_long_prompt() -> int:
        events: asyncio.Queue = asyncio.Queue()  # both requests' events, in the order they were made
        running = Submission(
            random_prompt(4, 6), SamplingParams(max_tokens=100, temperature=0), events=events
        )
        long = Submission(
            long_prompt, SamplingParams(max_tokens=1, temperature=0), events=events, first_index=1
        )
        try:
            with scheduler.wake, torch.inference_mode():
                scheduler.waiting.append(running)
                scheduler.step()  # its prompt is prefilled: the stream runs
                await asyncio.sleep(0)  # its first token, handed to this loop
                while not events.empty():
                    events.get_nowait()
                scheduler.waiting.append(long)
                for _ in range(30):  # the long prompt's 15 chunks, and room to spare
                    scheduler.step()
        finally:
            scheduler.close()
        await asyncio.sleep(0)  # the steps' events
        tokens_meanwhile = 0
        while (event := events.get_nowait()).index == 0:
            assert isinstance(event, Output), event
            tokens_meanwhile += len(event.tokens)
        assert isinstance(event, Output) and event.finish_reason == "length"  # the long prompt's reply
        return tokens_meanwhile

    assert asyncio.run(stream_beside_long_prompt()) >= 120 // 8 - 1


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


def test_a_group_prefill_leaves_its_complete_rows_out_of_later_chunks(model: GPT) -> None:
    """A 100-token prompt and three of 8, 32 tokens a chunk: the first chunk computes 8 of each, the
    next ones the long prompt alone, 32 at a time (124 tokens in all, where every row in every forward
    would compute 4 × 104); each prompt gets the logits it gets alone."""
    prompts = [random_prompt(100, 1), random_prompt(8, 2), random_prompt(8, 3), random_prompt(8, 4)]
    pool = PagedKVCache(model, max_rows=4, num_blocks=12)
    spent, logits = [], {}
    with torch.inference_mode():
        prefill = Prefill.start(model, pool, prompts, [None] * 4, [True] * 4, 32, [0] * 4)
        while not prefill.finished:
            cost, ready = prefill.step()
            spent.append(cost)
            logits |= {r.row: r.logits for r in ready}
        for row, prompt in enumerate(prompts):
            alone = model(torch.tensor([prompt]))[0]
            torch.testing.assert_close(logits[row], alone, rtol=0, atol=1e-4)
    assert spent == [32, 32, 32, 28]


def test_a_group_is_prefilled_longest_first_and_each_reply_is_its_own_prompts(
    model: GPT, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_start, lengths = Prefill.start, []

    def start(model: GPT, pool: PagedKVCache, prompts: list[list[int]], *rest: object) -> Prefill:
        lengths.append([len(prompt) for prompt in prompts])
        return real_start(model, pool, prompts, *rest)

    monkeypatch.setattr(Prefill, "start", start)
    engine = Engine(model, tiny_tokenizer())
    prompts = [random_prompt(length, seed) for seed, length in enumerate((5, 40, 12, 70))]
    scheduler = Scheduler(engine, 4, 4, Metrics(), "tiny", chunk_tokens=32)
    replies = serve(scheduler, [(prompt, SamplingParams(max_tokens=6, temperature=0)) for prompt in prompts])
    assert lengths == [[70, 40, 12, 5]]
    for prompt, (tokens, reason) in zip(prompts, replies, strict=True):
        (expected,) = engine.complete(prompt, max_tokens=6, temperature=0)
        assert (tokens, reason) == ([t.id for t in expected], "length")
