"""
Continuous batching: one thread per loaded model runs a loop of steps, and every running sequence
of every request shares each step.

    step: drop cancelled sequences → admit preempted sequences, then waiting requests, into free
          rows while the KV blocks of their prompts are free (the prefill takes them, and computes
          the prompts together from where the prefix cache leaves off, up to
          INFERENCE_PREFILL_CHUNK_TOKENS per step (prefill.py); a complete prompt's blocks join the
          batch) → pick one token per sequence (one that cannot be picked fails that request alone)
          → retire the finished ones (their blocks back to the pool, named by their tokens for the
          prefix cache; the last row moves into a freed row, so the running rows stay at the front) → give
          every row a block for its next position → one decode forward (replayed as a CUDA graph with
          INFERENCE_CUDA_GRAPHS, decode_graphs.py)

When a running row needs a block and none is free, the latest admitted holder of blocks gives its up,
first come first served: the prefill under way (new prompts are the latest; a preempted sequence's
prefill keeps its first place) is put back to wait, or a running sequence is preempted. A preempted
sequence keeps everything but its KV (its tokens, text, generator, tool state), and a put-back
prefill its place in the queue; their blocks are named for the prefix cache (what of them is still
kept when they come back is not computed again), and they are prefilled again (in chunks, as a prompt
is), ahead of new requests, once blocks are free.

Each row has its own position and mask (paged_cache.py), and each sequence its own seeded generator,
so what a request gets does not depend on what else is in the batch (but for a preempted sequence's
recompute, which in bf16 can round differently from the steps it replaces). Results go back to the event
loop through an asyncio.Queue per request: a step's events are handed over together in one
call_soon_threadsafe, before the decode forward, so the loop sends them while the model computes and
never waits on it.
"""

import asyncio
import itertools
import logging
import math
import random
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import torch

from inference.decode_graphs import CaptureFailed, DecodeGraphs
from inference.metrics import Metrics
from inference.paged_cache import OutOfBlocks, PagedKVCache, blocks_for
from inference.prefill import Prefill
from inference.prefix_cache import BLOCK_TOKENS, Hit
from trainer.engine import Engine, Row, TextStream, is_greedy, sample

log = logging.getLogger("inference")
PREFILL_TOKEN_BUDGET = 8192  # prompts prefilled together in one forward, counted padded (one always goes)


class QueueFull(Exception):
    pass


class Unloaded(Exception):
    """The model was unloaded between its lookup and this submission."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # alternatives per generated token; None: no logprobs at all
    prompt_logprobs: int | None = None  # score the prompt's own tokens (echo) with these alternatives


@dataclass
class TokenScore:
    """A token, its log-probability under the model (before temperature), and the top alternatives."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Output:
    """What one sequence added in one step: text (held back while it may start a stop string),
    its new tokens, and once it is done, why ("stop" or "length")."""

    index: int
    text: str
    tokens: list[TokenScore]
    finish_reason: str | None = None


@dataclass
class PromptScores:
    first_index: int  # of the submission's sequences
    scores: list[TokenScore | None]  # None for the first prompt token (nothing before it)


@dataclass
class Failure:
    message: str
    status: int = 500  # 400: the request itself cannot be served here


class Submission:
    """n sequences sampled from one prompt, numbered from first_index (a request with several prompts
    makes one submission per prompt, all on one queue). The event loop reads `events`."""

    def __init__(
        self,
        prompt: list[int],
        params: SamplingParams,
        n: int = 1,
        events: asyncio.Queue | None = None,
        first_index: int = 0,
    ) -> None:
        self.prompt, self.params, self.n, self.first_index = prompt, params, n, first_index
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = events or asyncio.Queue()
        self.cancelled = False  # set by the event loop when the client goes away
        self.created = time.perf_counter()
        self.sequences: list[Sequence] = []  # made by the scheduler once the prompt is prefilled
        self.counted = False  # its prompt in the metrics (a put-back prefill looks it up again)


Event = Output | PromptScores | Failure


def deliver(items: list[tuple[asyncio.Queue, Event]]) -> None:
    for events, event in items:
        events.put_nowait(event)


@dataclass(eq=False)  # one sequence is equal only to itself
class Sequence:
    submission: Submission
    index: int
    row: Row
    stream: TextStream
    held: str = ""  # decoded text not yet sent: it may be the start of a stop string
    last_token: int = 0
    tokens: list[int] = field(default_factory=list)  # chosen so far (the last one not yet fed)
    generated: int = 0
    last_time: float = 0.0
    finish_reason: str | None = None
    pending: list[TokenScore] = field(default_factory=list)
    admitted: int = 0  # when it first joined the batch: the latest admitted is preempted first


def prompt_of(entry: Submission | Sequence) -> list[int]:
    """The tokens to prefill: a submission's prompt, or a preempted sequence's prompt and every token
    chosen so far."""
    if isinstance(entry, Sequence):
        return entry.submission.prompt + entry.tokens
    return entry.prompt


def submission_of(entry: Submission | Sequence) -> Submission:
    """The request a prefill's entry serves (a preempted sequence's, for a sequence)."""
    return entry.submission if isinstance(entry, Sequence) else entry


def scored(entry: Submission | Sequence) -> bool:
    """A prompt whose every position's logits are wanted (echo with logprobs): computed in full."""
    return isinstance(entry, Submission) and entry.params.prompt_logprobs is not None


def arrival(entry: Submission | Sequence) -> float:
    return submission_of(entry).created


def to_compute(entry: Submission | Sequence, hit: Hit | None) -> int:
    """Prompt tokens a prefill computes: those past what the prefix cache holds."""
    return len(prompt_of(entry)) - (0 if hit is None else hit.length)


def token_scores(logprobs: torch.Tensor, tokens: list[int], top: int) -> list[TokenScore]:
    """Each row's chosen token with its log-probability and the `top` likeliest alternatives."""
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    if top > 0:
        values, indices = torch.topk(logprobs, top, dim=-1)
        alternatives = [
            list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)
        ]
    else:
        alternatives = [[] for _ in tokens]
    return [TokenScore(t, lp, alt) for t, lp, alt in zip(tokens, chosen, alternatives, strict=True)]


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        max_batch_size: int,
        max_waiting: int,
        metrics: Metrics,
        name: str,
        prefix_tokens: int = 0,
        chunk_tokens: int | None = None,
        kv_tokens: int | None = None,
        decode_graphs: bool = False,
    ) -> None:
        self.engine, self.model = engine, engine.model
        self.context = self.model.config.sequence_len
        self.max_batch_size, self.max_waiting = max_batch_size, max_waiting
        self.metrics, self.name = metrics, name
        # Positions of KV for the running rows (None: every row at the full context, none ever waits).
        kv_blocks = blocks_for(kv_tokens) if kv_tokens else max_batch_size * blocks_for(self.context)
        self.cache = PagedKVCache(self.model, max_batch_size, kv_blocks, prefix_tokens)
        # Fixed-shape decode steps, captured as CUDA graphs on a GPU (decode_graphs.py); None: eager.
        self.graphs = DecodeGraphs(self.model, self.cache, max_batch_size) if decode_graphs else None
        self.preempted: list[Sequence] = []  # resumed first admitted first, before new requests
        self.admissions = itertools.count(1)
        self.chunk_tokens = chunk_tokens  # of prompt prefilled per step; None: whole prompts
        self.prefilling: Prefill | None = None  # of the group below, while its prompts are computed
        # By row of `prefilling`, the submissions being prefilled (or the preempted sequence being
        # prefilled again); None once answered or in the batch.
        self.group: list[Submission | Sequence | None] = []
        self.logits: torch.Tensor | None = None  # next-token logits of the running rows
        self.running: list[Sequence] = []  # row i of the cache is running[i]
        self.waiting: deque[Submission] = deque()
        self.wake = threading.Condition()
        self.closed = False
        self.has_generated = False  # readiness: a token has come out of this model
        self.outbox: list[tuple[Submission, Event]] = []  # this step's events, not yet handed over
        self.thread = threading.Thread(target=self.run, name=f"scheduler-{name}", daemon=True)
        self.thread.start()

    # -- the event loop's side -------------------------------------------------------

    def submit(self, submissions: list[Submission]) -> None:
        """Queue all of a request's submissions, or none (QueueFull) when the waiting places run out."""
        with self.wake:
            if self.closed:
                raise Unloaded(self.name)
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
            if self.waiting and len(self.waiting) + len(submissions) > self.max_waiting:
                self.metrics.rejected.inc()
                raise QueueFull(f"{len(self.waiting)} requests are already waiting for this model")
            self.waiting.extend(submissions)
            self.metrics.waiting.labels(self.name).set(len(self.waiting))
            self.wake.notify()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling or self.preempted)

    def close_if_idle(self) -> bool:
        with self.wake:
            if self.busy:
                return False
            self.closed = True
            self.wake.notify()
        self.thread.join(timeout=10)
        return True

    def close(self, reason: str = "the model was unloaded") -> None:
        """Stop the model thread; what still waits or runs fails with `reason`."""
        with self.wake:
            self.closed = True
            self.wake.notify()
        self.thread.join(timeout=10)
        self.fail_all(reason, waiting=True)

    # -- the model thread -------------------------------------------------------------

    def run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.wake:
                    if not self.closed and not self.busy:
                        self.cache.drop_gather_buffers()
                    while not self.closed and not self.busy:
                        self.wake.wait()
                    if self.closed:
                        return
                try:
                    self.step()
                except Exception as error:  # a broken step fails its requests, not the server
                    log.exception("scheduler step failed")
                    self.fail_all(f"generation failed: {error}")

    def step(self) -> None:
        self.retire([i for i, s in enumerate(self.running) if s.submission.cancelled])
        self.admit()
        if self.running:
            self.choose_tokens()
            self.remember([i for i, s in enumerate(self.running) if s.finish_reason])
            self.retire([i for i, s in enumerate(self.running) if s.finish_reason or s.submission.cancelled])
        self.flush()
        if self.running:
            self.decode()
            self.flush()  # a sequence the KV cache could not hold ended there
        self.metrics.running.labels(self.name).set(len(self.running))
        used = self.cache.num_blocks - self.cache.free_blocks
        self.metrics.kv_cache_used_blocks.labels(self.name).set(used)
        self.metrics.prefix_cache_blocks.labels(self.name).set(len(self.cache.prefix.named))
        self.metrics.prefix_cache_tokens.labels(self.name).set(self.cache.prefix.tokens)

    def admit(self) -> None:
        """Prefill waiting submissions into free rows: a group of them at a time, as many as fit in one
        forward, up to chunk_tokens (when set) of prompt per step; rows whose prompt is complete join.
        Preempted sequences go first, one at a time, on the same budget (once a prefill under way has
        finished); new requests wait for them."""
        spent = 0
        if self.prefilling is not None:
            self.drop_cancelled()
        while self.chunk_tokens is None or spent < self.chunk_tokens:
            if self.prefilling is None:
                group, hits = self.take_resume()
                if not group and not self.preempted:
                    group, hits = self.take_group()
                if not group:
                    return
                # The longest to compute first: rows complete in order, and a chunk's forward leaves
                # the complete ones out (prefill.py).
                order = sorted(range(len(group)), key=lambda i: to_compute(group[i], hits[i]), reverse=True)
                group, hits = [group[i] for i in order], [hits[i] for i in order]
                self.group = group
                try:
                    self.count_prompts(group, hits)
                    prompts = [prompt_of(entry) for entry in group]
                    copies = [e.n - 1 if isinstance(e, Submission) else 0 for e in group]
                    self.prefilling = Prefill.start(
                        self.model,
                        self.cache,
                        prompts,
                        hits,
                        [scored(entry) for entry in group],
                        self.chunk_tokens,
                        copies,
                    )
                except Exception as error:
                    self.fail_prefill(error)
                    continue
            try:
                spent += self.prefill_chunk()
            except Exception as error:
                self.fail_prefill(error)

    def drop_cancelled(self) -> None:
        """The rows of the prefill under way whose client has gone stop there, their blocks back to the
        pool at once (a long prompt's may be many); a prefill with no row left ends."""
        for row, entry in enumerate(self.group):
            if entry is not None and submission_of(entry).cancelled:
                self.prefilling.drop(row)
                self.group[row] = None
        if self.prefilling.finished:
            self.end_prefill()

    def fail_prefill(self, error: Exception) -> None:
        """The prefill in progress failed: its requests fail; the running ones go on. A join it failed
        in may have left blocks in rows past the running ones: they go back to the pool too."""
        log.exception("prefill failed")
        for submission in self.unanswered():
            self.send(submission, Failure(f"generation failed: {error}"))
            submission.cancelled = True  # a preempted sequence's request is over too
        self.end_prefill()
        for row in range(len(self.running), len(self.cache.tables)):
            self.cache.release(row)

    def end_prefill(self) -> None:
        """No prefill under way: the blocks its rows still hold go back to the pool."""
        if self.prefilling is not None:
            self.prefilling.release()
        self.prefilling, self.group = None, []

    def put_back_prefill(self) -> None:
        """The prefill under way gives its blocks up: its requests wait again at the front of the queue
        (a preempted sequence's stays at the front of its own), the blocks computed so far named for
        the prefix cache, for when they are prefilled again."""
        prefill = self.prefilling
        entries = sorted((e for e in self.group if e is not None), key=arrival)  # the group is longest first
        for row, entry in enumerate(self.group):
            if entry is not None:
                prefill.cache.name_row(row, prompt_of(entry))
        with self.wake:
            self.waiting.extendleft(reversed([e for e in entries if isinstance(e, Submission)]))
            self.metrics.waiting.labels(self.name).set(len(self.waiting))
        self.metrics.preemptions.inc(len(entries))
        self.end_prefill()

    def take_group(self) -> tuple[list[Submission], list[Hit | None]]:
        """Waiting submissions for one prefill, with what the prefix cache holds of their prompts: as
        many as have free rows and free KV blocks for their prompts, within the token budget. One that
        the whole cache could not hold fails."""
        group, hits, rows, longest, blocks, counted = [], [], len(self.running), 0, 0, set()
        with self.wake:
            while self.waiting and rows + self.waiting[0].n <= self.max_batch_size:
                submission = self.waiting[0]
                if submission.cancelled:
                    self.waiting.popleft()
                    continue
                alone = self.blocks_to_start(len(submission.prompt), submission.n, None)
                if alone > self.cache.num_blocks:
                    self.waiting.popleft()
                    self.send(submission, Failure(too_long(submission, alone, self.cache.capacity), 400))
                    continue
                hit = self.lookup(submission)
                kept = self.kept_blocks(hit) - counted  # one count each, however many prompts share one
                needed = self.blocks_to_admit(len(submission.prompt), submission.n, hit, kept)
                padded = max(longest, len(submission.prompt)) * (len(group) + 1)
                if blocks + needed > self.cache.free_blocks or (group and padded > PREFILL_TOKEN_BUDGET):
                    break
                group.append(self.waiting.popleft())
                hits.append(hit)
                rows, longest = rows + submission.n, max(longest, len(submission.prompt))
                blocks, counted = blocks + needed, counted | kept
            self.metrics.waiting.labels(self.name).set(len(self.waiting))
        return group, hits

    def blocks_to_start(self, prompt_length: int, n: int, hit: Hit | None) -> int:
        """Blocks a prompt takes to be prefilled and for each of its n sequences' first token: its own
        past the whole ones its hit shares, a copy of its partial last block for each other sequence
        (they share the whole ones), and a block for each first token when the prompt fills its last."""
        whole = 0 if hit is None else hit.length // BLOCK_TOKENS
        partial = prompt_length % BLOCK_TOKENS > 0
        return blocks_for(prompt_length) - whole + (n - 1) * partial + n * (not partial)

    def blocks_to_admit(self, prompt_length: int, n: int, hit: Hit | None, kept: set[int]) -> int:
        """Free blocks a prompt needs to be admitted: those it takes (blocks_to_start) and the kept
        blocks of its hit, free until it shares them. At most the whole pool: a prompt that needs every
        block takes its hit's partial block over rather than copying it (own_last_block)."""
        return min(self.blocks_to_start(prompt_length, n, hit) + len(kept), self.cache.num_blocks)

    def kept_blocks(self, hit: Hit | None) -> set[int]:
        """A hit's blocks that no row holds: counted as free until a prefill shares them."""
        return set() if hit is None else {block for block in hit.blocks if not self.cache.holders[block]}

    def prefill_chunk(self) -> int:
        """One chunk of the prefill in progress; each prompt it completes joins the batch in its n rows
        (a preempted sequence: in its row). The tokens computed."""
        prefill = self.prefilling
        spent, ready = prefill.step()
        for r in sorted(ready, key=lambda r: arrival(self.group[r.row])):  # first come, first admitted
            entry = self.group[r.row]
            if isinstance(entry, Sequence):
                self.join(prefill, r.row, [entry], r.logits)
                self.preempted.remove(entry)
            elif self.start_sequences(entry, r.logits):
                self.join(prefill, r.row, entry.sequences, r.logits)
            else:  # answered: nothing to generate
                prefill.release(r.row)
            self.group[r.row] = None
        if prefill.finished:
            self.end_prefill()
        return spent

    def join(self, prefill: Prefill, row: int, sequences: list[Sequence], logits: torch.Tensor) -> None:
        """Add sequences to the batch, each continuing from a row of the prefill (its blocks, held since
        the prefill started: joining takes none from the running rows). The prompt's whole blocks, never
        written again, are named at once: a prompt that starts alike shares them while these run."""
        first = len(self.running)
        rows = list(range(first, first + len(sequences)))
        self.cache.take_row(prefill.cache, row, rows, prefill.spare[row])
        prompt = prompt_of(sequences[0])
        self.cache.name_row(first, prompt[: len(prompt) // BLOCK_TOKENS * BLOCK_TOKENS])
        new_logits = logits[-1:].expand(len(sequences), -1).clone()  # rows get moved in place later
        self.logits = new_logits if self.logits is None else torch.cat([self.logits[:first], new_logits])
        for sequence in sequences:  # first come, first served: a resumed sequence keeps its place
            sequence.admitted = sequence.admitted or next(self.admissions)
        self.running += sequences

    def make_room(self) -> None:
        """Free blocks for the running rows: the latest admitted holder gives its blocks up, the prefill
        under way (put back to wait) or a running sequence (preempted)."""
        latest = max(range(len(self.running)), key=lambda row: self.running[row].admitted)
        resumed = [e.admitted for e in self.group if isinstance(e, Sequence)]
        prefill_place = min(resumed, default=math.inf)  # new prompts come after every running one
        if self.prefilling is not None and prefill_place > self.running[latest].admitted:
            self.put_back_prefill()
        else:
            self.preempt(latest)

    def preempt(self, row: int) -> None:
        """Take a sequence out of the batch to be prefilled again later: its blocks go back to the pool,
        named for the prefix cache (its resume finds what of them is still kept)."""
        sequence = self.running[row]
        self.remember([row])
        self.retire([row])
        self.preempted.append(sequence)
        self.metrics.preemptions.inc()

    def take_resume(self) -> tuple[list[Sequence], list[Hit | None]]:
        """The first admitted of the preempted sequences, to be prefilled again (its prompt and every
        token chosen so far), once a row and the blocks for it are free; it stays in `preempted` until
        it runs. A sequence that had grown to the whole cache ends there."""
        while self.preempted and len(self.running) < self.max_batch_size:
            sequence = min(self.preempted, key=lambda s: s.admitted)  # by admission, not preemption
            tokens = prompt_of(sequence)
            if sequence.submission.cancelled:
                self.preempted.remove(sequence)
            elif blocks_for(len(tokens)) > self.cache.num_blocks:
                self.preempted.remove(sequence)
                self.end_at_capacity(sequence)
            else:
                # Room for its next token too, so that it is not preempted again at once.
                hit = self.lookup(sequence)
                needed = self.blocks_to_admit(len(tokens), 1, hit, self.kept_blocks(hit))
                return ([sequence], [hit]) if needed <= self.cache.free_blocks else ([], [])
        return [], []

    def unanswered(self) -> list[Submission]:
        """The submissions of the prefill in progress that have neither joined the batch nor been
        answered (for a preempted sequence, its request)."""
        entries = [e for e in self.group if e is not None]
        return [submission_of(e) for e in entries]

    def lookup(self, entry: Submission | Sequence) -> Hit | None:
        """The longest start of the prompt the prefix cache holds (none for a prompt to score: that
        needs the logits at every position)."""
        return None if scored(entry) else self.cache.prefix.lookup(prompt_of(entry))

    def count_prompts(self, group: list[Submission | Sequence], hits: list[Hit | None]) -> None:
        """The prompts of a prefill and what the prefix cache held of them, in the metrics once per
        request: not for a preempted sequence's recompute or a put-back prefill's second start (its
        prompt was counted the first time)."""
        for entry, hit in zip(group, hits, strict=True):
            if isinstance(entry, Submission) and not entry.counted:
                entry.counted = True
                self.metrics.prompt_tokens.inc(len(entry.prompt))
                if not scored(entry):
                    self.metrics.prefix_cache_queries.inc(len(entry.prompt))
                    self.metrics.prefix_cache_hits.inc(0 if hit is None else hit.length)

    def remember(self, rows: list[int]) -> None:
        """Name the blocks of these rows, about to give them back, in the prefix cache: the next turn of
        their chat starts with their prompt and reply."""
        for row in rows:
            self.cache.name_row(row, prompt_of(self.running[row]))

    def start_sequences(self, submission: Submission, logits: torch.Tensor) -> bool:
        """Send the prompt's scores when asked for, and make the submission's n sequences; False
        when it has nothing to generate (an echo with max_tokens 0)."""
        prompt, params = submission.prompt, submission.params
        if params.prompt_logprobs is not None:
            logprobs = torch.log_softmax(logits[:-1], dim=-1)
            scores = token_scores(logprobs, prompt[1:], params.prompt_logprobs) if len(prompt) > 1 else []
            self.send(submission, PromptScores(submission.first_index, [None, *scores]))
        if params.max_tokens == 0:
            for index in range(submission.n):
                self.send(submission, Output(submission.first_index + index, "", [], "length"))
            return False
        now = time.perf_counter()
        for index in range(submission.n):
            seed = random.randrange(2**62) if params.seed is None else params.seed + index
            generator = None if is_greedy(params.temperature) else self.engine.row_generator(seed)
            stream = TextStream(self.engine.tokenizer)
            row = Row(generator)
            submission.sequences.append(Sequence(submission, submission.first_index + index, row, stream))
            submission.sequences[-1].last_time = now
        return True

    def choose_tokens(self) -> None:
        """One token per running sequence. A sequence whose token cannot be chosen (the model gave its
        row non-finite logits, say) fails its own request; the other requests in the batch go on."""
        greedy = self.logits.argmax(dim=-1).tolist()  # one call for every greedy row
        finite = torch.isfinite(self.logits).all(dim=-1).tolist()
        chosen: dict[int, int] = {}  # batch row → its token
        for i, sequence in enumerate(self.running):
            try:
                chosen[i] = self.choose(sequence, self.logits[i], greedy[i], finite[i])
            except Exception as error:
                log.exception("sampling failed for one request")
                self.send(sequence.submission, Failure(f"generation failed: {error}"))
                sequence.submission.cancelled = True  # its other sequences stop too: the request has failed
        chosen = {i: token for i, token in chosen.items() if not self.running[i].submission.cancelled}
        rows, tokens = list(chosen), list(chosen.values())
        wanted = [self.running[i].submission.params.logprobs for i in rows]
        scores: list[TokenScore | None] = [None] * len(tokens)
        if any(w is not None for w in wanted):
            logprobs = torch.log_softmax(self.logits[rows].float(), dim=-1)
            scores = token_scores(logprobs, tokens, max(w or 0 for w in wanted))
            for score, w in zip(scores, wanted, strict=True):
                score.top = score.top[: w or 0]
        now = time.perf_counter()
        for i, token, score in zip(rows, tokens, scores, strict=True):
            self.accept(self.running[i], token, score, now)
        self.metrics.generation_tokens.inc(len(tokens))
        self.has_generated = True

    def choose(self, sequence: Sequence, logits: torch.Tensor, best: int, finite: bool) -> int:
        """The sequence's next token: the tool's output while it is forced, else greedy or sampled."""
        if not finite:
            raise ValueError("the model's next-token logits for this sequence are not finite (NaN or inf)")
        row, params = sequence.row, sequence.submission.params
        if row.forced:  # the tool's output, not sampled
            return row.forced.popleft()
        if is_greedy(params.temperature):
            return best
        return sample(logits, params.temperature, params.top_k, params.top_p, row.generator)

    def accept(self, sequence: Sequence, token: int, score: TokenScore | None, now: float) -> None:
        """Record one token: the tool state machine, stop tokens and strings, the length limit."""
        submission, params = sequence.submission, sequence.submission.params
        if sequence.generated == 0:
            self.metrics.time_to_first_token.observe(now - submission.created)
        else:
            self.metrics.time_per_output_token.observe(now - sequence.last_time)
        sequence.last_time = now
        sequence.generated += 1
        sequence.last_token = token
        sequence.tokens.append(token)
        self.engine.advance_row(sequence.row, token)
        if sequence.row.done:  # a stop token: it ends the sequence and is not part of the text
            sequence.finish_reason = "stop"
            text = sequence.held + sequence.stream.flush()
        else:
            sequence.pending.append(score or TokenScore(token, math.nan, []))
            # A reply cut at max_tokens inside a character ends before it (its bytes are in the
            # logprobs): as other OpenAI-compatible servers do, no U+FFFD for a character cut in two.
            text = sequence.held + sequence.stream.push(token)
            if sequence.generated >= params.max_tokens:
                sequence.finish_reason = "length"
        cut = min((i for i in (text.find(stop) for stop in params.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, sequence.finish_reason = text[:cut], "stop"
        keep = 0 if sequence.finish_reason else held_back(text, params.stop)
        sequence.held = text[len(text) - keep :]
        sent = text[: len(text) - keep]
        if sent or sequence.finish_reason or (sequence.pending and not keep):
            self.send(submission, Output(sequence.index, sent, sequence.pending, sequence.finish_reason))
            sequence.pending = []

    def retire(self, rows: list[int]) -> None:
        """Take these rows out of the batch (their blocks back to the pool); the last running row moves
        into each freed row."""
        for row in sorted(rows, reverse=True):
            last = len(self.running) - 1
            self.cache.release(row)
            if row != last:
                self.cache.move_row(last, row)
                self.running[row] = self.running[last]
                self.logits[row] = self.logits[last]
            self.running.pop()
        if self.logits is not None:
            self.logits = self.logits[: len(self.running)]

    def decode(self) -> None:
        self.reserve_next_positions()
        if not self.running:
            return
        tokens = [s.last_token for s in self.running]
        if self.graphs is not None:
            try:
                self.logits = self.graphs(tokens)
                return
            except CaptureFailed:  # serving goes on without graphs, from this step on
                log.exception(
                    "a CUDA graph of the decode step failed; %s decodes eagerly from now on", self.name
                )
                self.graphs = None
            except Exception:  # a replay that failed: this step fails as any would, the next run eagerly
                self.graphs = None
                raise
        fed = torch.tensor(tokens, device=self.engine.device)[:, None]
        self.logits = self.model(fed, kv_cache=self.cache.head(len(self.running)))[:, -1]

    def reserve_next_positions(self) -> None:
        """A block for every running row's next position. When none is left the latest admitted holder
        gives its blocks up (make_room); a sequence alone that fills the whole cache ends ("length")."""
        row = 0
        while row < len(self.running):
            try:
                self.cache.reserve(row, self.cache.lengths[row] + 1)
                row += 1
            except OutOfBlocks:
                if len(self.running) == 1 and self.prefilling is None:
                    self.end_at_capacity(self.running[0])
                    self.retire([0])
                    return
                self.make_room()
                row = 0  # rows moved: look again from the first (reserving twice takes nothing)

    def end_at_capacity(self, sequence: Sequence) -> None:
        log.warning("a sequence filled the whole KV cache (%d blocks)", self.cache.num_blocks)
        self.send(sequence.submission, Output(sequence.index, sequence.held, sequence.pending, "length"))

    def fail_all(self, message: str, waiting: bool = False) -> None:
        """Fail the running requests and those being prefilled (and the waiting ones too when the
        scheduler closes)."""
        failed = {id(s.submission): s.submission for s in self.running}
        failed |= {id(s): s for s in self.unanswered()}
        self.end_prefill()
        if waiting:
            with self.wake:
                failed |= {id(s): s for s in self.waiting}
                self.waiting.clear()
        failed |= {id(s.submission): s.submission for s in self.preempted}
        for row in range(len(self.cache.tables)):
            self.cache.release(row)
        self.running, self.logits, self.preempted = [], None, []
        for submission in failed.values():
            self.send(submission, Failure(message))
        self.flush()

    def send(self, submission: Submission, event: Event) -> None:
        self.outbox.append((submission, event))

    def flush(self) -> None:
        """Hand the queued events to their event loops, one call per loop (one wake-up per step)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = defaultdict(list)
        for submission, event in self.outbox:
            by_loop[submission.loop].append((submission.events, event))
        self.outbox = []
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(deliver, items)


def too_long(submission: Submission, blocks: int, capacity: int) -> str:
    return (
        f"this request needs {blocks * BLOCK_TOKENS} positions of KV cache (a prompt of "
        f"{len(submission.prompt)} tokens and the first token of each of its {submission.n} replies, which "
        f"share the prompt's whole blocks, in blocks of {BLOCK_TOKENS}), more than the server holds "
        f"({capacity}, INFERENCE_KV_CACHE_TOKENS): shorten the prompt or lower n"
    )
