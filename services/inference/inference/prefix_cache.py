"""
Prefix caching (as vLLM's automatic prefix caching): blocks of the paged KV pool that finished
sequences computed keep their keys and values, named by the tokens they hold, so a prompt that starts
with the same tokens shares them and prefills only what follows. Every chat turn re-sends the whole
conversation; with this cache turn N computes only its new message (and whatever of the last reply
tokenizes differently from how it was generated). A sequence's partial last block is named too (a block
of fewer tokens, never the parent of another), and a prompt that leaves the named blocks partway
through one reuses the part it shares: the next turn starts with all of the last one's tokens that it
repeats, and a preempted sequence comes back computing only its last token.

This is an index, no memory of its own: the pool (paged_cache.py) counts who holds each block, keeps
a named block that no row holds until it needs the block for something else (least recently released
first), and asks the index to forget it then.

A block is named by its parent and its own tokens: (parent id, tokens) stands for exactly one prefix, so
a hit is exact (no hash that could collide). A named block gets an id of its own, never reused, as a
pool block is. The keys and values at a position depend only on the tokens up to it (rotary positions
are absolute, windows only mask), so a shared block holds what a fresh prefill would compute. The smear
state at the boundary, the embedding of the last reused token, is recomputed from that token
(GPT.embed), as it is a function of the token alone.
"""

import itertools
from collections import defaultdict
from dataclasses import dataclass

BLOCK_TOKENS = 16  # vLLM's default block size: small enough that a chat turn's tail is mostly reused


Key = tuple[int, tuple[int, ...]]  # a block's parent's id and its own tokens


@dataclass
class Named:
    id: int  # 0 is the parent of every first block
    block: int  # the pool block that holds its keys and values
    key: Key

    @property
    def size(self) -> int:
        return len(self.key[1])


@dataclass
class Hit:
    """The first `length` tokens of a prompt, found: the pool blocks that hold them, in order (the last
    one possibly used in part: a row that continues it needs a copy to write into)."""

    length: int
    blocks: list[int]


class PrefixCache:
    def __init__(self, max_tokens: int) -> None:
        self.max_blocks = max_tokens // BLOCK_TOKENS  # named blocks that no row holds, at most
        self.named: dict[Key, Named] = {}
        self.by_block: dict[int, Named] = {}
        self.ids = itertools.count(1)
        self.tokens = 0  # held by the named blocks
        # Each block's key under (its parent's id, its first token), in dicts used as ordered sets:
        # where a prompt that leaves the named blocks partway through one finds the blocks it may
        # share a start with (those whose first token it has next).
        self.children: defaultdict[tuple[int, int], dict[Key, None]] = defaultdict(dict)

    def lookup(self, prompt: list[int]) -> Hit | None:
        """The longest start of the prompt the cache holds, leaving at least its last token to compute
        (its logits pick the first new token): a run of whole blocks, then as much of one more block
        (whole or partial) as the prompt goes on alike."""
        found, parent = [], 0
        reusable = len(prompt) - 1
        for index in range(reusable // BLOCK_TOKENS):
            named = self.named.get(name(parent, prompt, index))
            if named is None:
                break
            found.append(named.block)
            parent = named.id
        start = len(found) * BLOCK_TOKENS
        rest = prompt[start : start + min(BLOCK_TOKENS, reusable - start)]
        shared, best = 0, None
        for candidate in self.children.get((parent, rest[0]), ()) if rest else ():
            length = common_start(candidate[1], rest)
            if length > shared:
                shared, best = length, candidate
        if best is not None:
            found.append(self.named[best].block)
        return Hit(start + shared, found) if found else None

    def name_blocks(self, tokens: list[int], table: list[int]) -> list[int]:
        """Name a sequence's blocks (`table`, in order) by the tokens they hold, its partial last one
        included. A block whose tokens another block already holds stays unnamed (it goes back to the
        pool's free blocks when given back). Returns the blocks no longer named: partial ones that a
        block now named holds all of."""
        parent, dropped = 0, []
        for index, block in enumerate(table[: -(-len(tokens) // BLOCK_TOKENS)]):
            key = name(parent, tokens, index)
            named = self.named.get(key) or self.block_that_continues(key)
            if named is None:
                dropped += self.superseded(key)
                if block in self.by_block:  # named after a parent since taken back: its old name is lost
                    self.forget(block)
                named = Named(next(self.ids), block, key)
                self.add(named)
            parent = named.id
        return dropped

    def block_that_continues(self, key: Key) -> Named | None:
        """A named block that starts with a partial block's tokens and so holds all it would (a
        whole block stored by a later turn of its chat, say)."""
        parent, tokens = key
        if len(tokens) == BLOCK_TOKENS:
            return None
        for sibling in self.children.get((parent, tokens[0]), ()):
            if sibling[1][: len(tokens)] == tokens:
                return self.named[sibling]
        return None

    def superseded(self, key: Key) -> list[int]:
        """Forget the partial siblings a block about to be named by `key` starts with: of no more use
        (a partial block is never a parent: nothing hangs on it). Their pool blocks."""
        parent, tokens = key
        siblings = self.children.get((parent, tokens[0]), {})
        partial = [s for s in siblings if len(s[1]) < len(tokens) and tokens[: len(s[1])] == s[1]]
        return [self.forget(self.named[s].block) for s in partial]

    def add(self, named: Named) -> None:
        self.named[named.key] = named
        self.by_block[named.block] = named
        self.children[(named.key[0], named.key[1][0])][named.key] = None
        self.tokens += named.size

    def forget(self, block: int) -> int:
        """Unname a pool block (the pool takes it back for other tokens)."""
        named = self.by_block.pop(block)
        del self.named[named.key]
        self.tokens -= named.size
        group = (named.key[0], named.key[1][0])
        del self.children[group][named.key]
        if not self.children[group]:
            del self.children[group]
        return block


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
