"""
Chat batches: conversations rendered with their loss mask (chat_format) and packed into rows of
seq_len+1 tokens, each row starting with a conversation's BOS:

- a row is filled with the largest buffered conversation that still fits (the earliest of equals);
- when none fits, the row is either padded (`pad=True`, SFT: no answer is ever cut; padding is not
  trained on) or filled with the start of the shortest one, the rest of it dropped (`pad=False`,
  midtraining: packed like pretraining);
- targets are the next tokens where the mask marks the assistant's tokens, −1 (ignored) elsewhere;
- a conversation longer than a row keeps its first seq_len+1 tokens.

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
        pad: bool,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        buffer_size: int = 100,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.tokenizer, self.mixture = tokenizer, mixture
        self.batch_size, self.row_len, self.pad = batch_size, seq_len + 1, pad
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.buffer_size = buffer_size
        self.cursor = rank  # the next conversation to buffer
        self.consumed = 0  # conversations this rank has packed
        self.buffer: list[tuple[int, list[int], list[int]]] = []  # (index, ids, mask), oldest first
        if state is not None:
            self.load_state_dict(state)

    def render(self, index: int) -> tuple[int, list[int], list[int]]:
        ids, mask = render_conversation(self.tokenizer, self.mixture[index]["messages"], self.row_len)
        return index, ids, mask

    def refill(self) -> None:
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self.render(self.cursor % len(self.mixture)))
            self.cursor += self.world_size

    def pack_row(self) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        while len(ids) < self.row_len:
            self.refill()
            remaining = self.row_len - len(ids)
            fitting = [i for i, (_, row, _) in enumerate(self.buffer) if len(row) <= remaining]
            if fitting:
                chosen = max(fitting, key=lambda i: (len(self.buffer[i][1]), -i))
            elif self.pad:
                ids += [self.tokenizer.bos_token_id] * remaining
                mask += [0] * remaining
                break
            else:
                chosen = min(range(len(self.buffer)), key=lambda i: (len(self.buffer[i][1]), i))
            _, row, row_mask = self.buffer.pop(chosen)
            ids += row[:remaining]
            mask += row_mask[:remaining]
            self.consumed += 1
        return ids, mask

    def __iter__(self) -> "ConversationLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each batch_size × seq_len; targets −1 where nothing is to be learned."""
        rows = [self.pack_row() for _ in range(self.batch_size)]
        ids = torch.tensor([row for row, _ in rows], dtype=torch.long)
        mask = torch.tensor([row_mask for _, row_mask in rows], dtype=torch.bool)
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
