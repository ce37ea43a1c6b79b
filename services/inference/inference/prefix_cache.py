"""
Prefix caching: the keys and values of finished sequences, kept in blocks of BLOCK_TOKENS tokens, so a
prompt that starts with the same tokens prefills only what follows them. Every chat turn re-sends the
whole conversation; with this cache turn N computes only its new message (and whatever of the last
reply tokenizes differently from how it was generated).

A block is named by its parent block and its own tokens: (parent id, tokens) stands for exactly one
prefix, so a hit is exact (no hash that could collide). The keys and values at a position depend only
on the tokens up to it (rotary positions are absolute, windows only mask), so a reused block is what a
fresh prefill would compute. The smear state at the boundary, the embedding of the last reused token,
is recomputed from that token (GPT.embed), as it is a function of the token alone.

At most max_tokens are kept, least recently used out first. Every lookup and store touches a whole
chain from its first block, children before parents, so a parent is always more recent than its
children: eviction takes leaves first and never strands a reachable block behind a missing parent.
"""

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK_TOKENS = 16  # vLLM's default block size: small enough that a chat turn's tail is mostly reused


@dataclass
class Block:
    id: int
    keys: torch.Tensor  # (n_layer, BLOCK_TOKENS, kv_heads, head_dim)
    values: torch.Tensor


@dataclass
class Hit:
    """The first `length` tokens of a prompt, found: every layer's (length, kv_heads, head_dim)."""

    length: int
    keys: torch.Tensor
    values: torch.Tensor


class PrefixCache:
    def __init__(self, max_tokens: int) -> None:
        self.max_blocks = max_tokens // BLOCK_TOKENS
        self.blocks: OrderedDict[tuple[int, tuple[int, ...]], Block] = OrderedDict()
        self.ids = itertools.count(1)  # 0 is the parent of every first block

    @property
    def tokens(self) -> int:
        return len(self.blocks) * BLOCK_TOKENS

    def lookup(self, prompt: list[int]) -> Hit | None:
        """The longest run of cached blocks the prompt starts with, leaving at least its last token to
        compute (its logits pick the first new token)."""
        chain, found, parent = [], [], 0
        for index in range((len(prompt) - 1) // BLOCK_TOKENS):
            key = name(parent, prompt, index)
            block = self.blocks.get(key)
            if block is None:
                break
            chain.append(key)
            found.append(block)
            parent = block.id
        if not chain:
            return None
        self.touch(chain)
        keys = torch.cat([block.keys for block in found], dim=1)
        values = torch.cat([block.values for block in found], dim=1)
        return Hit(len(chain) * BLOCK_TOKENS, keys, values)

    def store(self, tokens: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the full blocks of a sequence, given every layer's (≥ len(tokens), kv_heads, head_dim)
        keys and values for it; blocks already cached are only touched."""
        chain, parent = [], 0
        for index in range(min(len(tokens) // BLOCK_TOKENS, self.max_blocks)):
            key = name(parent, tokens, index)
            block = self.blocks.get(key)
            if block is None:
                span = slice(index * BLOCK_TOKENS, (index + 1) * BLOCK_TOKENS)
                block = Block(next(self.ids), keys[:, span].clone(), values[:, span].clone())
                self.blocks[key] = block
            chain.append(key)
            parent = block.id
        self.touch(chain)
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)

    def touch(self, chain: list[tuple[int, tuple[int, ...]]]) -> None:
        for key in reversed(chain):  # the first block last: the most recent
            self.blocks.move_to_end(key)


def name(parent: int, tokens: list[int], index: int) -> tuple[int, tuple[int, ...]]:
    """Block `index` of `tokens`, after the block whose id is `parent`."""
    return parent, tuple(tokens[index * BLOCK_TOKENS : (index + 1) * BLOCK_TOKENS])
