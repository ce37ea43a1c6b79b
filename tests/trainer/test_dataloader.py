"""BOS-aligned best-fit packing: aligned rows, nothing lost but crops, exact resume, disjoint ranks."""

import json
import re
from pathlib import Path

import pytest
import torch

from trainer import dataset
from trainer.dataloader import PackingLoader
from trainer.settings import TrainerSettings
from trainer.tokenizer import Tokenizer

from conftest import write_shards


def train_shards(settings: TrainerSettings) -> list[Path]:
    return dataset.list_shards(settings, "train")


def test_rows_start_with_bos_and_targets_are_inputs_shifted(tiny_tokenizer: Tokenizer, tiny_kit) -> None:
    loader = PackingLoader(tiny_tokenizer, train_shards(tiny_kit), batch_size=4, seq_len=64, buffer_docs=6)
    for _ in range(20):
        inputs, targets = next(loader)
        assert inputs.shape == targets.shape == (4, 64) and inputs.dtype == torch.long
        assert (inputs[:, 0] == tiny_tokenizer.bos_token_id).all()
        assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_no_document_token_is_lost_except_where_cropped(tiny_tokenizer: Tokenizer, tiny_kit) -> None:
    shards = train_shards(tiny_kit)
    documents = {}
    for text in dataset.iter_texts(shards):
        documents[re.match(r"doc\d+", text).group()] = tiny_tokenizer.encode(
            text, prepend=tiny_tokenizer.bos_token_id
        )
    loader = PackingLoader(
        tiny_tokenizer, shards, batch_size=1, seq_len=256, buffer_docs=5, tokenizer_batch=2
    )
    bos, seen, cropped_tokens, rows = tiny_tokenizer.bos_token_id, set(), 0, 0
    last_group = (len(shards) - 1, loader.row_groups(shards[-1].name) - 1)
    while loader.epoch == 0 and (loader.shard_pos, loader.group) < last_group:
        inputs, targets = next(loader)
        row = [*inputs[0].tolist(), targets[0, -1].item()]
        rows += 1
        starts = [i for i, token in enumerate(row) if token == bos]
        assert starts[0] == 0
        segments = [row[a:b] for a, b in zip(starts, [*starts[1:], len(row)], strict=True)]
        for i, segment in enumerate(segments):
            name = re.match(r"doc\d+", tiny_tokenizer.decode(segment[1:8])).group()
            assert name not in seen, f"{name} placed twice in one epoch"
            seen.add(name)
            whole = documents[name]
            if segment != whole:  # only the last document of a row may be cropped, and only its tail
                assert i == len(segments) - 1 and whole[: len(segment)] == segment
                cropped_tokens += len(whole) - len(segment)
    assert rows > 10 and loader.tokens_cropped == cropped_tokens
    assert 0 < loader.crop_fraction < 1


def test_resume_from_saved_state_gives_identical_next_batches(tiny_tokenizer: Tokenizer, tiny_kit) -> None:
    shards = train_shards(tiny_kit)
    loader = PackingLoader(tiny_tokenizer, shards, batch_size=2, seq_len=96, buffer_docs=7, tokenizer_batch=3)
    for _ in range(40):  # several epochs of this tiny data: the buffer mixes documents of two epochs
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # a checkpoint stores it as JSON
    assert loader.epoch >= 1
    expected = [next(loader) for _ in range(15)]
    resumed = PackingLoader(
        tiny_tokenizer, shards, batch_size=2, seq_len=96, buffer_docs=7, tokenizer_batch=3, state=state
    )
    for (x, y), (rx, ry) in zip(expected, (next(resumed) for _ in range(15)), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.state_dict() == loader.state_dict()


def test_two_ranks_read_disjoint_row_groups_covering_all_data(tiny_tokenizer: Tokenizer, tiny_kit) -> None:
    shards = train_shards(tiny_kit)
    keys = {}
    for rank in (0, 1):
        loader = PackingLoader(tiny_tokenizer, shards, batch_size=1, seq_len=64, rank=rank, world_size=2)
        keys[rank] = []
        while (batch := loader.read_next_batch()) and loader.epoch == 0:
            keys[rank] += [key for key, _ in batch]
    assert set(keys[0]).isdisjoint(keys[1])
    every_doc = {(p.name, g, r) for p in shards for g in range(3) for r in range(4)}
    assert set(keys[0]) | set(keys[1]) == every_doc
    assert len(keys[0]) == len(set(keys[0]))  # each document once per epoch


def test_state_from_another_world_size_is_refused(tiny_tokenizer: Tokenizer, tiny_kit) -> None:
    shards = train_shards(tiny_kit)
    state = PackingLoader(tiny_tokenizer, shards, batch_size=1, seq_len=64).state_dict()
    with pytest.raises(ValueError, match="same number of processes"):
        PackingLoader(tiny_tokenizer, shards, batch_size=1, seq_len=64, rank=0, world_size=2, state=state)


def test_real_kit_packs_and_resumes_exactly(data_kit: Path, tmp_path: Path) -> None:
    settings = TrainerSettings(base_dir=tmp_path, data_dir=data_kit)
    shards = train_shards(settings)
    tokenizer = Tokenizer.train(dataset.iter_texts(shards, doc_cap=10_000), vocab_size=2048)
    loader = PackingLoader(tokenizer, shards, batch_size=4, seq_len=512)
    for _ in range(30):
        inputs, _ = next(loader)
        assert (inputs[:, 0] == tokenizer.bos_token_id).all()
    state = loader.state_dict()
    expected = [next(loader) for _ in range(5)]
    resumed = PackingLoader(tokenizer, shards, batch_size=4, seq_len=512, state=state)
    assert all(
        torch.equal(a[0], b[0]) for a, b in zip(expected, (next(resumed) for _ in range(5)), strict=True)
    )
    assert 0 < loader.crop_fraction < 1


def test_split_docs_chunks_long_documents_instead_of_cropping_them(
    tiny_tokenizer: Tokenizer, tiny_kit
) -> None:
    shards = train_shards(tiny_kit)
    cropped = PackingLoader(tiny_tokenizer, shards, batch_size=2, seq_len=64, buffer_docs=8)
    split = PackingLoader(tiny_tokenizer, shards, batch_size=2, seq_len=64, buffer_docs=8, split_docs=True)
    for _ in range(30):
        next(cropped)
        inputs, _ = next(split)
        assert (inputs[:, 0] == tiny_tokenizer.bos_token_id).all()
    assert cropped.crop_fraction > 0.5  # most of each long document is lost at this row length ...
    assert split.crop_fraction < 0.1  # ... and almost none of it when chunked
    assert all(length <= 65 for length, *_ in split.buffer)


def test_split_docs_resume_is_exact_and_needs_the_same_setting(tiny_tokenizer: Tokenizer, tiny_kit) -> None:
    shards = train_shards(tiny_kit)
    options = {"batch_size": 2, "seq_len": 48, "buffer_docs": 9, "tokenizer_batch": 3, "split_docs": True}
    loader = PackingLoader(tiny_tokenizer, shards, **options)
    for _ in range(25):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    assert any(entry[4] > 0 for entry in state["buffer"])  # later chunks of a document are buffered
    expected = [next(loader) for _ in range(10)]
    resumed = PackingLoader(tiny_tokenizer, shards, **options, state=state)
    assert all(
        torch.equal(a[0], b[0]) for a, b in zip(expected, (next(resumed) for _ in range(10)), strict=True)
    )
    with pytest.raises(ValueError, match="split-docs"):
        PackingLoader(tiny_tokenizer, shards, **{**options, "split_docs": False}, state=state)


class CharTokenizer:
    """One token per character (its code point), BOS = 0: document lengths are exactly as written."""

    bos_token_id = 0

    def encode_batch(self, texts: list[str], prepend: int) -> list[list[int]]:
        return [[prepend, *map(ord, text)] for text in texts]


def test_equally_long_documents_are_packed_in_the_order_they_were_read(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, [["A" * 10, "B" * 10, "C" * 10, "D" * 30]])
    loader = PackingLoader(CharTokenizer(), shards, batch_size=1, seq_len=21, buffer_docs=4)
    inputs, targets = next(loader)
    row = [*inputs[0].tolist(), targets[0, -1].item()]
    assert row == [0, *[ord("A")] * 10, 0, *[ord("B")] * 10]  # A, B, C fit alike: the first two come first


def test_shards_are_opened_in_order_only_when_reading_gets_to_them(
    tiny_tokenizer: Tokenizer, tiny_kit
) -> None:
    """So training starts on the first shards while later ones are still downloading."""
    shards, asked = train_shards(tiny_kit), []
    loader = PackingLoader(
        tiny_tokenizer,
        shards,
        batch_size=1,
        seq_len=64,
        buffer_docs=2,
        tokenizer_batch=2,
        wait_for_shard=asked.append,
    )
    next(loader)
    assert asked == shards[:1]
    while loader.epoch == 0:
        next(loader)
    assert asked == shards  # each once, in reading order


def test_a_resumed_loader_may_plan_more_shards_but_not_other_ones(
    tiny_tokenizer: Tokenizer, tiny_kit
) -> None:
    shards = train_shards(tiny_kit)
    options = {"batch_size": 1, "seq_len": 64, "buffer_docs": 3, "tokenizer_batch": 2}
    loader = PackingLoader(tiny_tokenizer, shards[:2], **options)
    for _ in range(3):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    assert loader.epoch == 0 and state["shards_read"] == [shards[0].name]
    longer = PackingLoader(tiny_tokenizer, shards, **options, state=state)  # a longer run's plan
    for _ in range(3):
        assert torch.equal(next(loader)[0], next(longer)[0])
    with pytest.raises(ValueError, match="saved over other shards"):
        PackingLoader(tiny_tokenizer, shards[1:], **options, state=state)
