"""
Generation: the one implementation behind sampling during training, the evals, RL, chat_cli and the
inference service.

A KV cache keeps every layer's keys and values, so a prompt is run once (prefill) and each new token
costs one position of compute. Each cache row has its own length: rows can hold prompts of different
lengths, and a row prefilled on its own can be copied into a batch (one prefill shared by several
samples, or a request joining a running batch).

The engine samples rows independently (each from its own seeded generator, so row i of a batch equals
a single run with seed + i), runs the calculator tool when a row writes
<|python_start|>expression<|python_end|> and forces <|output_start|>result<|output_end|> into that row
(forced tokens are marked as such), and stops a row at <|assistant_end|> or <|bos|>.
"""

import codecs
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from trainer.execution import calculator
from trainer.gpt import GPT
from trainer.tokenizer import Tokenizer

# Below this temperature sampling is greedy, as in vLLM (its _SAMPLING_EPS): the distribution is already
# all but one-hot, and dividing by a smaller temperature overflows float32 (1e-46 is 0 there: 0/0 is NaN).
GREEDY_BELOW_TEMPERATURE = 1e-5


class KVCache:
    """Keys and values of every layer for batch_size rows of up to max_len positions, each row with its
    own length, and each row's last token embedding (for smear)."""

    def __init__(self, model: GPT, batch_size: int, max_len: int) -> None:
        c = model.config
        shape = (c.n_layer, batch_size, max_len, c.n_kv_head, c.head_dim)
        device, dtype = model.wte.weight.device, model.compute_dtype
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.last_embedding = torch.zeros(batch_size, 1, c.n_embd, device=device, dtype=dtype)
        self.positions = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # of this forward
        self.end = 0  # one past the last position written by this forward, over all rows

    @property
    def batch_size(self) -> int:
        return self.keys.size(1)

    @property
    def max_len(self) -> int:
        return self.keys.size(2)

    def start(self, num_tokens: int) -> torch.Tensor:
        """Positions (B, T) of the tokens a forward pass is about to add after each row's length."""
        self.positions = self.lengths[:, None] + torch.arange(num_tokens, device=self.lengths.device)
        self.end = int(self.lengths.max()) + num_tokens
        assert self.end <= self.max_len, f"KV cache full: {self.end} > {self.max_len} positions"
        return self.positions

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys/values at each row's positions; return every row's first `end`."""
        rows = torch.arange(self.batch_size, device=k.device)[:, None]
        self.keys[layer, rows, self.positions] = k
        self.values[layer, rows, self.positions] = v
        return self.keys[layer, :, : self.end], self.values[layer, :, : self.end]

    def advance(self) -> None:
        self.lengths += self.positions.size(1)

    def swap_last_embedding(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Store each row's newest token embedding from this forward's (B, T, C) embeddings; return the
        previous ones."""
        previous = self.last_embedding.clone()
        self.last_embedding.copy_(embeddings[:, -1:])
        return previous

    def copy_rows(self, source: "KVCache", source_row: int, rows: list[int]) -> None:
        """Make `rows` of this cache continue from row `source_row` of another (e.g. a prefill)."""
        length = int(source.lengths[source_row])
        assert length <= self.max_len, f"{length} cached positions do not fit in {self.max_len}"
        index = torch.tensor(rows, device=self.keys.device)
        self.keys[:, index, :length] = source.keys[:, source_row, :length].unsqueeze(1)
        self.values[:, index, :length] = source.values[:, source_row, :length].unsqueeze(1)
        self.lengths[index] = length
        self.last_embedding[index] = source.last_embedding[source_row]


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> int:
    """One token from a row's logits: the argmax when greedy (temperature below
    GREEDY_BELOW_TEMPERATURE), else from the top-k / nucleus (top-p) share of the tempered distribution."""
    if is_greedy(temperature):
        return int(logits.argmax())
    # Shifted so the largest is 0 before dividing: large logits over a small temperature then go to
    # -inf, never the largest to +inf, whose softmax would be NaN (inf - inf).
    logits = (logits.float() - logits.max()) / temperature
    if top_k is not None and top_k < logits.size(-1):
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p  # the smallest set ≥ top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW_TEMPERATURE


@dataclass
class GeneratedToken:
    id: int
    forced: bool  # written by the tool, not sampled


@dataclass
class Row:
    """One sample's state: tool calls in progress, tokens waiting to be forced, done or not."""

    generator: torch.Generator | None
    forced: deque[int] = field(default_factory=deque)
    expression: list[int] | None = None  # tokens of an open <|python_start|> call
    done: bool = False


class Engine:
    def __init__(self, model: GPT, tokenizer: Tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        special = tokenizer.encode_special
        self.stop_tokens = {special("<|assistant_end|>"), tokenizer.bos_token_id}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    @torch.inference_mode()
    def prefill(self, prompt: list[int]) -> tuple[KVCache, torch.Tensor]:
        """A one-row cache holding the prompt, and the logits for the token after it."""
        cache = KVCache(self.model, batch_size=1, max_len=len(prompt))
        logits = self.model(torch.tensor([prompt], device=self.device), kv_cache=cache)[:, -1]
        return cache, logits

    @torch.inference_mode()
    def generate(
        self,
        prompt: list[int],
        num_samples: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 42,
    ) -> Iterator[list[GeneratedToken | None]]:
        """Yield one column per step: a GeneratedToken per row, None for rows already stopped. A stop
        token is yielded, then its row is done; generation ends when every row is, or at max_tokens."""
        assert prompt, "the prompt needs at least one token (e.g. <|bos|>)"
        prefill, logits = self.prefill(prompt)
        cache = KVCache(self.model, num_samples, len(prompt) + max_tokens)
        cache.copy_rows(prefill, 0, list(range(num_samples)))
        del prefill
        logits = logits.expand(num_samples, -1)
        rows = [
            Row(None if is_greedy(temperature) else self.row_generator(seed + i)) for i in range(num_samples)
        ]
        for _ in range(max_tokens):
            column: list[GeneratedToken | None] = []
            for row, row_logits in zip(rows, logits, strict=True):
                if row.done:
                    column.append(None)
                    continue
                forced = bool(row.forced)
                token = (
                    row.forced.popleft()
                    if forced
                    else sample(row_logits, temperature, top_k, top_p, row.generator)
                )
                self.advance_row(row, token)
                column.append(GeneratedToken(token, forced))
            yield column
            if all(row.done for row in rows):
                return
            fed = [
                t.id if t is not None else self.tokenizer.bos_token_id for t in column
            ]  # stopped rows idle
            logits = self.model(torch.tensor(fed, device=self.device)[:, None], kv_cache=cache)[:, -1]

    def row_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def advance_row(self, row: Row, token: int) -> None:
        """The tool-use state machine: collect a python call, and queue its result once it closes."""
        if token in self.stop_tokens:
            row.done = True
        elif token == self.python_start:
            row.expression = []
        elif token == self.python_end and row.expression is not None:
            result = calculator(self.tokenizer.decode(row.expression))
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
            row.expression = None
        elif row.expression is not None:
            row.expression.append(token)

    def complete(self, prompt: list[int], num_samples: int = 1, **kwargs) -> list[list[GeneratedToken]]:
        """Each row's generated tokens, without the stop token that ended it."""
        completions: list[list[GeneratedToken]] = [[] for _ in range(num_samples)]
        for column in self.generate(prompt, num_samples, **kwargs):
            for completion, token in zip(completions, column, strict=True):
                if token is not None and token.id not in self.stop_tokens:
                    completion.append(token)
        return completions


class TextStream:
    """Token ids in, text out, never splitting a character: a UTF-8 sequence cut across tokens is held
    back until it is complete (bytes that can never complete become U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.decoder.decode(self.tokenizer.decode_bytes([token]))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)
