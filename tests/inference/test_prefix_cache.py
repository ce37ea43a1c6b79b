"""The prefix cache: a chat's next turn shares the KV blocks of the turns before it, with the same
greedy reply as a full prefill; many streams that start alike share one copy of their start; and the
cache keeps no more than its bound of blocks no row holds, least recently given back out first, never
naming a block the pool has taken back for other tokens."""

import asyncio
from pathlib import Path

import httpx
import torch

from inference.metrics import Metrics
from inference.paged_cache import PagedKVCache
from inference.prefill import Prefill
from inference.prefix_cache import BLOCK_TOKENS, PrefixCache
from inference.scheduler import Output, SamplingParams, Scheduler, Submission
from tests.inference.conftest import (
    AUTH_HEADER,
    prefilled_pool,
    random_prompt,
    tiny_tokenizer,
    write_checkpoint,
)
from tests.inference.test_paged_cache import counter, reply
from trainer.chat_format import render_for_completion
from trainer.engine import Engine
from trainer.gpt import GPT
from trainer.tokenizer import Tokenizer


def test_a_prompt_continued_from_the_cache_gets_the_logits_of_a_full_prefill(tmp_path: Path) -> None:
    """The smear at the boundary included: the first new token mixes in the last reused one. The whole
    blocks are shared, not copied; the one used in part is copied, and stays as it was."""
    model = write_checkpoint(tmp_path / "runs", "m", "sft", 1, seed=4).eval()
    assert model.smear_lambda.abs().item() > 0.05  # a smear that matters
    torch.manual_seed(0)
    earlier = torch.randint(0, 500, (50,)).tolist()
    prompt = earlier[:40] + torch.randint(0, 500, (9,)).tolist()  # a next turn: shared start, new end
    with torch.inference_mode():
        pool = prefilled_pool(model, [earlier], max_rows=1, num_blocks=8, prefix_tokens=1024)
        earlier_blocks, third_block = list(pool.tables[0]), pool.keys[:, 2 * 16 : 3 * 16].clone()
        pool.name_row(0, earlier)
        pool.release(0)
        assert pool.free_blocks == 8
        hit = pool.prefix.lookup(prompt)
        assert hit is not None and hit.length == 40  # two whole blocks and 8 tokens of the third
        prefill = Prefill.start(model, pool, [prompt], [hit], [False], None, [0])
        assert prefill.cache.tables[0][:2] == earlier_blocks[:2]
        assert prefill.cache.tables[0][2] not in earlier_blocks
        spent, (ready,) = prefill.step()
        assert spent == len(prompt) - 40
        continued = ready.logits[-1]
        full = model(torch.tensor([prompt]))[0, -1]
    torch.testing.assert_close(continued, full, rtol=0, atol=1e-4)
    torch.testing.assert_close(pool.keys[:, 2 * 16 : 3 * 16], third_block, rtol=0, atol=0)


async def chat(
    scheduler: Scheduler, tokenizer: Tokenizer, turns: int
) -> list[tuple[list[int], list[int], float]]:
    """A conversation of greedy turns, each re-sending the whole history: per turn its prompt, its reply
    and the prompt tokens found in the prefix cache so far."""
    messages, history = [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Tell me more about cats, part {turn}."})
        prompt = render_for_completion(tokenizer, messages)
        submission = Submission(prompt, SamplingParams(max_tokens=20, temperature=0))
        scheduler.submit([submission])
        reply = []
        while True:
            event = await submission.events.get()
            assert isinstance(event, Output), event
            reply += [score.token for score in event.tokens]
            if event.finish_reason:
                break
        hits = scheduler.metrics.registry.get_sample_value("inference_prefix_cache_hits_total")
        history.append((prompt, reply, hits))
        messages.append({"role": "assistant", "content": tokenizer.decode(reply)})
    return history


def test_each_chat_turn_prefills_only_its_new_tokens_and_replies_as_the_engine_does(
    served_base: Path, tmp_path: Path
) -> None:
    tokenizer = Tokenizer.load(served_base / "runs" / "tiny" / "tokenizer")
    model = write_checkpoint(tmp_path / "runs", "tiny", "sft", 1, seed=10).eval()
    engine = Engine(model, tokenizer)
    scheduler = Scheduler(engine, 4, 4, Metrics(), "tiny", prefix_tokens=4096)
    try:
        history = asyncio.run(chat(scheduler, tokenizer, turns=4))
    finally:
        scheduler.close()
    hits_so_far = 0.0  # the first turn has nothing to reuse
    for turn, (prompt, answer, hits) in enumerate(history):
        (expected,) = engine.complete(prompt, max_tokens=20, temperature=0)
        assert answer == [t.id for t in expected if t.id not in engine.stop_tokens], f"turn {turn}"
        # All of the previous turn's prompt came from the cache, its partial last block included.
        wanted = len(history[turn - 1][0]) if turn else 0
        assert hits - hits_so_far >= wanted, f"turn {turn} reused {hits - hits_so_far} tokens"
        hits_so_far = hits


def test_a_hit_needs_every_earlier_block_to_match() -> None:
    prefix = PrefixCache(max_tokens=1024)
    tokens = list(range(100, 150))
    prefix.name_blocks(tokens, [11, 12, 13, 14])
    other_first_block = [7] * BLOCK_TOKENS + tokens[BLOCK_TOKENS:]
    assert prefix.lookup(other_first_block) is None  # its second block matches, but not after this start
    diverging = tokens[:20] + [7] * 30  # a whole block, then 4 tokens of the next
    hit = prefix.lookup(diverging)
    assert hit is not None and (hit.length, hit.blocks) == (20, [11, 12])
    exact = prefix.lookup(tokens[:48])  # the last token is always computed
    assert exact is not None and (exact.length, exact.blocks) == (47, [11, 12, 13])


def test_a_sequences_partial_last_block_is_kept_for_the_prompt_that_continues_it() -> None:
    """50 tokens: 3 whole blocks and 2 more, named as a block of 2. The next turn, which starts with all
    50, reuses all 50; once a longer sequence holds those 2 in a whole block, the block of 2 goes."""
    prefix = PrefixCache(max_tokens=1024)
    tokens = list(range(100, 150))
    assert prefix.name_blocks(tokens, [1, 2, 3, 4]) == []
    assert prefix.tokens == 50 and len(prefix.named) == 4
    hit = prefix.lookup([*tokens, 7, 8])
    assert hit is not None and (hit.length, hit.blocks) == (50, [1, 2, 3, 4])
    longer = list(range(100, 170))  # the same sequence, grown, in blocks of another row
    assert prefix.name_blocks(longer, [5, 6, 7, 8, 9]) == [4]  # its 4th block holds the partial one
    assert prefix.lookup([*longer, 1]).blocks == [1, 2, 3, 8, 9]  # the blocks it shared are kept
    assert len(prefix.named) == 5 and prefix.tokens == 70
    assert prefix.name_blocks(tokens, [1, 2, 3, 10]) == []  # the 50 again: all held, by whole blocks
    assert len(prefix.named) == 5 and prefix.lookup([*tokens, 7]).blocks == [1, 2, 3, 8]


def test_a_block_named_again_after_its_parent_went_loses_its_old_name() -> None:
    """A held block named under a parent the pool has since taken back is named again under its new
    parent: one name per block, so the cache's count of named tokens stays true."""
    prefix = PrefixCache(max_tokens=1024)
    tokens = list(range(100, 132))
    prefix.name_blocks(tokens, [1, 2])
    prefix.forget(1)  # taken back by the pool; block 2, held by a row, is named after it still
    prefix.name_blocks(tokens, [3, 2])  # the row that holds 2 gives it back after a new first block
    assert sorted(named.block for named in prefix.named.values()) == [2, 3] == sorted(prefix.by_block)
    assert prefix.tokens == 32 and prefix.lookup([*tokens, 1]).blocks == [3, 2]


def named_and_given_back(pool: PagedKVCache, tokens: list[int]) -> list[int]:
    """A finished row's blocks (fake keys and values: only the names are looked at), named by its
    tokens and given back; its blocks."""
    pool.reserve(0, len(tokens))
    pool.lengths[0] = len(tokens)
    blocks = list(pool.tables[0])
    pool.name_row(0, tokens)
    pool.release(0)
    return blocks


def test_the_cache_keeps_its_bound_of_blocks_no_row_holds_least_recently_given_back_out_first(
    model: GPT,
) -> None:
    pool = PagedKVCache(model, max_rows=1, num_blocks=16, prefix_tokens=4 * BLOCK_TOKENS)
    a, b, c = ([start + i for i in range(2 * BLOCK_TOKENS)] for start in (1000, 2000, 3000))
    named_and_given_back(pool, a)
    named_and_given_back(pool, b)
    hit = pool.prefix.lookup([*a, 1])
    pool.share(hit.blocks)  # a row holds a's blocks...
    named_and_given_back(pool, c)  # ...so b's go for c's, not a's
    pool.give_back(hit.blocks)  # a is now the most recently given back
    assert pool.prefix.tokens == 4 * BLOCK_TOKENS and len(pool.kept) == 4
    assert pool.prefix.lookup([*b, 1]) is None
    for kept in (a, c):
        hit = pool.prefix.lookup([*kept, 1])
        assert hit is not None and hit.length == 2 * BLOCK_TOKENS
    assert pool.free_blocks == 16  # kept blocks are free to take
    off = PagedKVCache(model, max_rows=1, num_blocks=16, prefix_tokens=0)
    named_and_given_back(off, a)
    assert off.prefix.lookup([*a, 1]) is None and off.kept == {}


def test_a_kept_block_the_pool_takes_back_is_no_longer_found(model: GPT) -> None:
    """When free blocks run out, a row takes the least recently given back of the kept blocks, and the
    cache forgets what they held: a later prompt never finds keys and values overwritten since."""
    pool = PagedKVCache(model, max_rows=1, num_blocks=6, prefix_tokens=1024)
    a, b = ([start + i for i in range(2 * BLOCK_TOKENS)] for start in (1000, 2000))
    named_and_given_back(pool, a)
    b_blocks = named_and_given_back(pool, b)
    taken = pool.take(3)  # 2 free, then the oldest kept: a's last block, a child before its parent
    assert pool.free_blocks == 3 and pool.prefix.lookup([*b, 1]).blocks == b_blocks
    assert pool.prefix.lookup([*a, 1]).length == BLOCK_TOKENS  # a's first block alone is left
    pool.give_back(taken)
    pool.take(6)
    assert pool.prefix.lookup([*a, 1]) is None and pool.prefix.lookup([*b, 1]) is None
    assert pool.prefix.named == {} and pool.prefix.tokens == 0


def test_a_sequence_that_fills_the_pool_comes_back_from_its_kept_blocks(model: GPT) -> None:
    """60 positions in a pool of 4 blocks, preempted: its prompt and chosen token (61) come back
    computing one token, in the 4 blocks it gave up (no block is free for a copy of the fourth, which
    it takes over, unnamed), with the logits of a full prefill."""
    sequence = random_prompt(61, 1)
    with torch.inference_mode():
        pool = prefilled_pool(model, [sequence[:60]], max_rows=1, num_blocks=4, prefix_tokens=1024)
        blocks = list(pool.tables[0])
        pool.name_row(0, sequence)
        pool.release(0)
        hit = pool.prefix.lookup(sequence)
        assert hit.length == 60 and hit.blocks == blocks
        prefill = Prefill.start(model, pool, [sequence], [hit], [False], None, [0])
        assert prefill.cache.tables[0] == blocks and pool.free_blocks == 0
        assert pool.prefix.lookup(sequence).length == 3 * BLOCK_TOKENS  # the fourth is the row's now
        spent, (ready,) = prefill.step()
        full = model(torch.tensor([sequence]))[0, -1]
    assert spent == 1
    torch.testing.assert_close(ready.logits[-1], full, rtol=0, atol=1e-4)


def test_a_prompt_that_needs_every_block_and_continues_a_kept_partial_block_is_served(model: GPT) -> None:
    """A pool of 4 blocks keeps a finished 50-position sequence; the next turn, 56 tokens starting with
    those 50, needs the whole pool and gets it (its hit's partial block taken over, not copied), rather
    than waiting forever with every request behind it."""
    engine = Engine(model, tiny_tokenizer())
    scheduler = Scheduler(engine, 2, 4, Metrics(), "m", prefix_tokens=1024, kv_tokens=4 * BLOCK_TOKENS)
    greedy = SamplingParams(max_tokens=11, temperature=0)
    first = random_prompt(40, 1)

    async def two_turns() -> tuple[list[int], tuple[list[int], str | None]]:
        submission = Submission(first, greedy)
        scheduler.submit([submission])
        tokens, _ = await reply(submission)  # 40 + 10 positions computed (the last token is not fed)
        following = Submission(
            first + tokens[:10] + random_prompt(6, 2), SamplingParams(max_tokens=4, temperature=0)
        )
        scheduler.submit([following])
        return following.prompt, await asyncio.wait_for(reply(following), timeout=60)

    try:
        prompt, (tokens, reason) = asyncio.run(two_turns())
    finally:
        scheduler.close()
    assert counter(scheduler, "inference_prefix_cache_hits_total") == 50
    (expected,) = engine.complete(prompt, max_tokens=4, temperature=0)
    assert (tokens, reason) == ([t.id for t in expected], "length")


def test_streams_that_start_alike_share_one_copy_of_their_start(model: GPT) -> None:
    """Seven requests after the same 64-token system prompt, six of them sent while the first runs:
    all run together, none preempted, in a pool that could not hold a copy of it for each (its 4 blocks,
    named once the first prompt is prefilled, shared, and 2 of their own each: 18 of 20 blocks, where
    copies would take 42); each replies as the engine does."""
    engine = Engine(model, tiny_tokenizer())
    system = random_prompt(4 * BLOCK_TOKENS, 1)
    prompts = [system + random_prompt(5, 10 + i) for i in range(7)]
    scheduler = Scheduler(engine, 8, 8, Metrics(), "m", prefix_tokens=1024, kv_tokens=20 * BLOCK_TOKENS)
    params = SamplingParams(max_tokens=20, temperature=0)

    async def first_then_the_rest() -> tuple[int, list[tuple[list[int], str | None]]]:
        submissions = [Submission(prompt, params) for prompt in prompts]
        most_running = 0
        try:  # the test runs the scheduler's steps itself, holding its lock: the first cannot end early
            with scheduler.wake, torch.inference_mode():
                scheduler.waiting.append(submissions[0])
                scheduler.step()  # its prompt is prefilled: it runs
                scheduler.waiting.extend(submissions[1:])
                for _ in range(100):  # bounded: a scheduler that never ends would fail, not hang
                    if not scheduler.busy:
                        break
                    scheduler.step()
                    most_running = max(most_running, len(scheduler.running))
                assert not scheduler.busy
        finally:
            scheduler.close()
        await asyncio.sleep(0)  # the steps' events, handed to this loop
        return most_running, [await reply(submission) for submission in submissions]

    most_running, replies = asyncio.run(first_then_the_rest())
    assert most_running == 7 and counter(scheduler, "inference_preemptions_total") == 0
    assert counter(scheduler, "inference_prefix_cache_hits_total") == 6 * len(system)
    for prompt, (tokens, reason) in zip(prompts, replies, strict=True):
        (expected,) = engine.complete(prompt, max_tokens=20, temperature=0)
        assert (tokens, reason) == ([t.id for t in expected], "length")


def test_metrics_show_a_chat_turn_found_in_the_prefix_cache(server: str) -> None:
    def metric(name: str) -> float:
        lines = httpx.get(f"{server}/metrics", headers=AUTH_HEADER).text.splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith(name))

    messages = [{"role": "user", "content": "A first question that is long enough to fill a few blocks."}]
    body = {"model": "tiny-sft", "max_tokens": 8, "temperature": 0}
    hits, queries = (
        metric("inference_prefix_cache_hits_total"),
        metric("inference_prefix_cache_queries_total"),
    )
    for turn in range(2):
        response = httpx.post(
            f"{server}/v1/chat/completions", json={**body, "messages": messages}, headers=AUTH_HEADER
        )
        messages += [response.json()["choices"][0]["message"], {"role": "user", "content": f"And {turn}?"}]
    second_prompt = response.json()["usage"]["prompt_tokens"]
    assert metric("inference_prefix_cache_queries_total") - queries >= second_prompt
    assert metric("inference_prefix_cache_hits_total") - hits >= BLOCK_TOKENS
    assert metric("inference_prefix_cache_blocks") >= 1
    # the blocks hold every token of the replies' sequences but the last, partial blocks included
    assert (
        0 < metric("inference_prefix_cache_tokens") <= BLOCK_TOKENS * metric("inference_prefix_cache_blocks")
    )
