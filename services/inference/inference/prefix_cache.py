"""
Prefix caching: the keys and values of finished sequences, kept in blocks of BLOCK_TOKENS tokens, so a
prompt that starts with the same tokens prefills only what follows them. Every chat turn re-sends the
whole conversation; with this cache turn N computes only its new message (and whatever of the last
reply tokenizes differently from how it was generated). A sequence's partial last block is kept too
(a block of fewer tokens, never the parent of another), and a prompt that leaves the cached blocks
partway through one reuses the part it shares: the next turn starts with all of the last one's
tokens that it repeats, and a preempted sequence comes back computing only its last token.

A block is named by its parent block and its own tokens: (parent id, tokens) stands for exactly one
prefix, so a hit is exact (no hash that could collide). The keys and values at a position depend only
on the tokens up to it (rotary positions are absolute, windows only mask), so a reused block is what a
fresh prefill would compute. The smear state at the boundary, the embedding of the last reused token,
is recomputed from that token (GPT.embed), as it is a function of the token alone.

At most max_tokens // BLOCK_TOKENS blocks are kept (a partial block counts as one), least recently
used out first. Every lookup and store touches a whole
chain from its first block, children before parents, so a parent is always more recent than its
children: eviction takes leaves first and never strands a reachable block behind a missing parent.
"""

import itertools
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

BLOCK_TOKENS = 16  # vLLM's default block size: small enough that a chat turn's tail is mostly reused


Key = tuple[int, tuple[int, ...]]  # a block's parent's id and its own tokens


@dataclass
class Block:
    id: int
    keys: torch.Tensor  # (n_layer, BLOCK_TOKENS or fewer, kv_heads, head_dim)
    values: torch.Tensor
    key: Key | None = None  # once cached

    @property
    def size(self) -> int:
        return self.keys.size(1)


@dataclass
class Hit:
    """The first `length` tokens of a prompt, found: the blocks that hold them, in order (the last one
    possibly cut short)."""

    length: int
    blocks: list[Block]


class PrefixCache:
    def __init__(self, max_tokens: int) -> None:
        self.max_blocks = max_tokens // BLOCK_TOKENS
        self.blocks: OrderedDict[Key, Block] = OrderedDict()
        self.ids = itertools.count(1)  # 0 is the parent of every first block
        self.tokens = 0  # held by the blocks
        # Each block's key under (its parent's id, its first token), in dicts used as ordered sets:
        # where a prompt that leaves the cached blocks partway through one finds the blocks it may
        # share a start with (those whose first token it has next).
        self.children: defaultdict[tuple[int, int], dict[Key, None]] = defaultdict(dict)

    def lookup(self, prompt: list[int]) -> Hit | None:
        """The longest start of the prompt the cache holds, leaving at least its last token to compute
        (its logits pick the first new token): a run of whole blocks, then as much of one more block
        (whole or partial) as the prompt goes on alike."""
        chain, found, parent = [], [], 0
        reusable = len(prompt) - 1
        for index in range(reusable // BLOCK_TOKENS):
            key = name(parent, prompt, index)
            block = self.blocks.get(key)
            if block is None:
                break
            chain.append(key)
            found.append(block)
            parent = block.id
        start = len(chain) * BLOCK_TOKENS
        rest = prompt[start : start + min(BLOCK_TOKENS, reusable - start)]
        shared, key = 0, None
        for candidate in self.children.get((parent, rest[0]), ()) if rest else ():
            length = common_start(candidate[1], rest)
            if length > shared:
                shared, key = length, candidate
        if shared:
            chain.append(key)
            block = self.blocks[key]
            found.append(Block(block.id, block.keys[:, :shared], block.values[:, :shared]))
        if not chain:
            return None
        self.touch(chain)
        return Hit(sum(block.size for block in found), found)

    def store(self, tokens: list[int], kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the blocks of a sequence, its partial last one included. kv(start) gives every layer's
        (len(tokens) − start, kv_heads, head_dim) keys and values of tokens[start:]; it is asked once,
        from the first block not cached yet (blocks already cached are only touched)."""
        chain, parent = [], 0
        whole = min(len(tokens) // BLOCK_TOKENS, self.max_blocks)
        spans = [(i * BLOCK_TOKENS, (i + 1) * BLOCK_TOKENS) for i in range(whole)]
        if whole == len(tokens) // BLOCK_TOKENS and len(tokens) % BLOCK_TOKENS and self.max_blocks:
            spans.append((whole * BLOCK_TOKENS, len(tokens)))
        fetched_from, keys, values = None, None, None
        for start, end in spans:
            key = (parent, tuple(tokens[start:end]))
            block = self.blocks.get(key) or self.block_that_continues(key)
            if block is None:
                if fetched_from is None:
                    fetched_from, (keys, values) = start, kv(start)
                span = slice(start - fetched_from, end - fetched_from)
                block = Block(next(self.ids), keys[:, span].clone(), values[:, span].clone())
                self.add(key, block)
            chain.append(block.key)
            parent = block.id
        self.touch(chain)
        while len(self.blocks) > self.max_blocks:
            self.remove(next(iter(self.blocks)))

    def block_that_continues(self, key: Key) -> Block | None:
        """A cached block that starts with a partial block's tokens and so holds all it would (a
        whole block stored by a later turn of its chat, say)."""
        parent, tokens = key
        if len(tokens) == BLOCK_TOKENS:
            return None
        for sibling in self.children.get((parent, tokens[0]), ()):
            if sibling[1][: len(tokens)] == tokens:
                return self.blocks[sibling]
        return None

    def add(self, key: Key, block: Block) -> None:
        """Cache a block; a partial sibling it starts with is of no more use and goes."""
        parent, tokens = key
        siblings = self.children[(parent, tokens[0])]
        for sibling in [s for s in siblings if len(s[1]) < len(tokens) and tokens[: len(s[1])] == s[1]]:
            self.remove(sibling)  # a partial block is never a parent: nothing hangs on it
        block.key = key
        self.blocks[key] = block
        self.children[(parent, tokens[0])][key] = None
        self.tokens += block.size

    def remove(self, key: Key) -> None:
        block = self.blocks.pop(key)
        self.tokens -= block.size
        siblings = self.children[(key[0], key[1][0])]
        del siblings[key]
        if not siblings:
            del self.children[(key[0], key[1][0])]

    def touch(self, chain: list[Key]) -> None:
        for key in reversed(chain):  # the first block last: the most recent
            self.blocks.move_to_end(key)


def common_start(a: tuple[int, ...], b: list[int]) -> int:
    """How many tokens a and b start with alike."""
    shared = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        shared += 1
    return shared


def name(parent: int, tokens: list[int], index: int) -> Key:
    """Block `index` of `tokens`, after the block whose id is `parent`."""
    return parent, tuple(tokens[index * BLOCK_TOKENS : (index + 1) * BLOCK_TOKENS])
