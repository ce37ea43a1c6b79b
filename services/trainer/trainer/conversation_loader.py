"""
Chat batches: conversations rendered with their loss mask (chat_format) and laid out in rows that each
start with a conversation's BOS, in one of the reference's two ways:

- packed (the current SFT, the classic mid): rows of seq_len+1 tokens, each filled with the largest
  buffered conversation that still fits (the earliest of equals); when none fits, the rest of the row is
  padding, so no conversation is ever cut;
- one conversation a row (`one_per_row`, the classic SFT): each row holds one conversation, padded to the
  longest of its batch.

Targets are the next tokens where the mask allows, −1 (ignored) on padding and elsewhere: the mask is the
assistant's tokens (chat_format), or every token of the conversations (`learn_all`, the classic mid).
A conversation longer than seq_len keeps its first seq_len tokens (the reference renders at most 2048).

Rank r takes conversations r, r+W, r+2W, … of the mixture, looping over epochs. `progress` is the share
of the mixture consumed (over all ranks). `state_dict()` names the cursor and the buffered conversations
by index, so a checkpoint restores the same following batches.
"""

from typing import Any

import torch

from trainer.chat_format import render_conversation
from trainer.mixture import Mixture
from trainer.tokenizer import Tokenizer


class ConversationLoader:
    def __init__(
        self,
        tokenizer: Tokenizer,
        mixture: Mixture,
        batch_size: int,
        seq_len: int,
        learn_all: bool = False,
        one_per_row: bool = False,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        buffer_size: int = 100,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.tokenizer, self.mixture = tokenizer, mixture
        self.batch_size, self.seq_len, self.row_len = batch_size, seq_len, seq_len + 1
        self.learn_all, self.one_per_row = learn_all, one_per_row
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.buffer_size = 1 if one_per_row else buffer_size  # one a row: simply the next conversation
        self.cursor = rank  # the next conversation to buffer
        self.consumed = 0  # conversations this rank has laid out
        self.buffer: list[tuple[int, list[int], list[int]]] = []  # (index, ids, mask), oldest first
        if state is not None:
            self.load_state_dict(state)

    def render(self, index: int) -> tuple[int, list[int], list[int]]:
        ids, mask = render_conversation(self.tokenizer, self.mixture[index]["messages"], self.seq_len)
        return index, ids, [1] * len(ids) if self.learn_all else mask

    def refill(self) -> None:
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self.render(self.cursor % len(self.mixture)))
            self.cursor += self.world_size

    def pack_row(self) -> tuple[list[int], list[int]]:
        """A row of row_len tokens: whole conversations, best fit first, then padding."""
        ids: list[int] = []
        mask: list[int] = []
        while len(ids) < self.row_len:
            self.refill()
            remaining = self.row_len - len(ids)
            fitting = [i for i, (_, row, _) in enumerate(self.buffer) if len(row) <= remaining]
            if not fitting:  # pad: "we can't just throw it away" (the reference)
                ids += [self.tokenizer.bos_token_id] * remaining
                mask += [0] * remaining
                break
            chosen = max(fitting, key=lambda i: (len(self.buffer[i][1]), -i))
            _, row, row_mask = self.buffer.pop(chosen)
            ids += row
            mask += row_mask
            self.consumed += 1
        return ids, mask

    def next_conversation(self) -> tuple[list[int], list[int]]:
        self.refill()
        _, ids, mask = self.buffer.pop(0)
        self.consumed += 1
        return ids, mask

    def __iter__(self) -> "ConversationLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each batch_size × (row length − 1); targets −1 where nothing is learned."""
        rows = [
            self.next_conversation() if self.one_per_row else self.pack_row() for _ in range(self.batch_size)
        ]
        width = max(len(row) for row, _ in rows)
        pad = self.tokenizer.bos_token_id
        ids = torch.tensor([row + [pad] * (width - len(row)) for row, _ in rows], dtype=torch.long)
        mask = torch.tensor([m + [0] * (width - len(m)) for _, m in rows], dtype=torch.bool)
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -1)
        return ids[:, :-1].to(self.device), targets.to(self.device)

    @property
    def progress(self) -> float:
        """Share of one pass over the mixture packed so far, all ranks together."""
        return self.consumed * self.world_size / len(self.mixture)

    def state_dict(self) -> dict[str, Any]:
        return {
            "size": len(self.mixture),
            "cursor": self.cursor,
            "consumed": self.consumed,
            "buffer": [index for index, _, _ in self.buffer],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["size"] != len(self.mixture):
            raise ValueError(
                f"dataloader state was saved over a mixture of {state['size']:,} conversations, this one has "
                f"{len(self.mixture):,}: resume with the same mixture"
            )
        self.cursor, self.consumed = state["cursor"], state["consumed"]
        self.buffer = [self.render(index) for index in state["buffer"]]
