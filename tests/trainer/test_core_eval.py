"""CORE as nanochat computes it: prompts, example selection, scoring, centring; and the kit's bundle."""

import json
from pathlib import Path

import pytest
import torch

from trainer import core_eval
from trainer.core_eval import CoreTask
from trainer.gpt import GPT, GPTConfig
from trainer.tokenizer import Tokenizer

MC = CoreTask("mc", "multiple_choice", "mc.jsonl", 1, "\nAnswer: ", 0.25)
SCHEMA = CoreTask("schema", "schema", "schema.jsonl", 1, " ", 0.5)
LM = CoreTask("lm", "language_modeling", "lm.jsonl", 1, " ", 0.0)


def test_multiple_choice_prompts_share_the_context_and_differ_in_the_choice() -> None:
    shot = {"query": "Sky colour?", "choices": ["green", "blue"], "gold": 1}
    item = {"query": "Grass colour?", "choices": ["green", "red"], "gold": 0}
    assert core_eval.render_prompts(MC, item, [shot]) == [
        "Sky colour?\nAnswer: blue\n\nGrass colour?\nAnswer: green",
        "Sky colour?\nAnswer: blue\n\nGrass colour?\nAnswer: red",
    ]


def test_schema_prompts_differ_in_the_context_and_share_the_continuation() -> None:
    shot = {"context_options": ["The cup", "The ball"], "continuation": "rolled away.", "gold": 1}
    item = {
        "context_options": ["Tom fed the cat", "Tom fed the car"],
        "continuation": "and it purred.",
        "gold": 0,
    }
    assert core_eval.render_prompts(SCHEMA, item, [shot]) == [
        "The ball rolled away.\n\nTom fed the cat and it purred.",
        "The ball rolled away.\n\nTom fed the car and it purred.",
    ]


def test_language_modeling_prompts_trim_contexts_and_come_without_and_with_the_continuation() -> None:
    shot = {"context": "  2 + 2 =  ", "continuation": "4"}
    item = {"context": "3 + 3 = ", "continuation": "6"}
    assert core_eval.render_prompts(LM, item, [shot]) == ["2 + 2 = 4\n\n3 + 3 =", "2 + 2 = 4\n\n3 + 3 = 6"]


def test_few_shot_examples_and_the_subset_follow_the_published_seeds() -> None:
    # random.Random(1234 + idx).sample(all indices but idx, k)
    assert core_eval.fewshot_indices(3, 100, 10) == [20, 51, 40, 31, 30, 45, 65, 80, 46, 90]
    assert core_eval.fewshot_indices(0, 20, 3) == [15, 4, 1]
    assert core_eval.fewshot_indices(5, 20, 0) == []


def test_examples_are_shuffled_with_seed_1337_before_max_per_task(tmp_path: Path) -> None:
    (tmp_path / "eval_data").mkdir()
    rows = [{"context": f"row {i}", "continuation": "x"} for i in range(10)]
    (tmp_path / "eval_data" / "lm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chosen = [r["context"] for r in core_eval.load_examples(tmp_path, LM, max_per_task=4)]
    assert chosen == ["row 0", "row 3", "row 7", "row 2"]  # Random(1337) puts 0, 3, 7, 2 first


def test_a_prompt_longer_than_the_context_is_scored_whole(tiny_tokenizer: Tokenizer) -> None:
    """As the reference scores its GPT: never cropped; the choice with the lowest mean continuation loss
    over the whole prompt, each scored on its own, is the model's answer."""
    torch.manual_seed(0)
    config = GPTConfig(
        sequence_len=16, vocab_size=tiny_tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64
    )
    gpt = GPT(config)
    gpt.init_weights()
    torch.nn.init.normal_(gpt.lm_head.weight, std=1.0)  # choices far apart in loss
    seen: list[torch.Tensor] = []

    def model(input_ids: torch.Tensor) -> torch.Tensor:
        seen.append(input_ids)
        return gpt(input_ids)

    item = {"query": "kamito neru sapolide " * 8 + "?", "choices": ["grafu", "berqua shtka", "de"], "gold": 0}
    rows, starts, ends = core_eval.tokenize_prompts(
        tiny_tokenizer, MC.task_type, core_eval.render_prompts(MC, item, [])
    )
    assert min(len(row) for row in rows) > 2 * config.sequence_len
    with torch.no_grad():
        losses = []
        for row, start, end in zip(rows, starts, ends, strict=True):
            logits = gpt(torch.tensor([row]))[0]
            target = torch.tensor(row[start:end])
            losses.append(torch.nn.functional.cross_entropy(logits[start - 1 : end - 1], target).item())
    best = losses.index(min(losses))
    for gold in range(3):
        examples = [{**item, "gold": gold}]
        right = core_eval.score_example(model, tiny_tokenizer, MC, examples, 0, torch.device("cpu"))
        assert right == (gold == best), (gold, losses)
    width = max(len(row) for row in rows)
    assert all(ids.shape == (3, width) for ids in seen)  # every token of every prompt, none cropped
    assert [seen[0][i, : len(row)].tolist() for i, row in enumerate(rows)] == rows


def write_bundle(folder: Path) -> list[CoreTask]:
    """Three small tasks, one of each type, with answers spread evenly over the choices."""
    mc = [
        {"query": f"Question {i}?", "choices": ["alpha", "beta", "gamma", "delta"], "gold": i % 4}
        for i in range(8)
    ]
    schema = [
        {
            "context_options": [f"Tom saw cat {i}", f"Tom saw dog {i}"],
            "continuation": "and waved.",
            "gold": i % 2,
        }
        for i in range(8)
    ]
    lm = [{"context": f"Count {i} then", "continuation": f"{i + 1} ok"} for i in range(8)]
    (folder / "eval_data").mkdir(parents=True)
    for name, rows in (("mc", mc), ("schema", schema), ("lm", lm)):
        (folder / "eval_data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = "".join(
        f"-\n  label: {t.label}\n  dataset_uri: {t.dataset_uri}\n  num_fewshot: [{t.num_fewshot}]\n"
        f"  icl_task_type: {t.task_type}\n"
        for t in (MC, SCHEMA, LM)
    )
    (folder / "core.yaml").write_text("icl_tasks:\n" + tasks)
    (folder / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc,25\nschema,50\nlm,0\n")
    return core_eval.load_tasks(folder)


class Oracle:
    """Predicts every next token of a correct prompt perfectly, and knows nothing about wrong ones."""

    def __init__(self, tokenizer: Tokenizer, bundle: Path, tasks: list[CoreTask]) -> None:
        self.tokenizer, self.correct = tokenizer, []
        for task in tasks:
            examples = core_eval.load_examples(bundle, task)
            for idx, item in enumerate(examples):
                shots = [examples[i] for i in core_eval.fewshot_indices(idx, len(examples), task.num_fewshot)]
                prompts = core_eval.render_prompts(task, item, shots)
                right = prompts[-1] if task.task_type == "language_modeling" else prompts[item["gold"]]
                self.correct.append(tokenizer.encode(right, prepend=tokenizer.bos_token_id))

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*input_ids.shape, self.tokenizer.vocab_size)
        for b, row in enumerate(input_ids.tolist()):
            if any(row[: len(c)] == c for c in self.correct):
                logits[b, torch.arange(len(row) - 1), row[1:]] = 30.0
        return logits


def test_core_of_an_oracle_is_one_and_of_a_constant_scorer_zero(
    tiny_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    tasks = write_bundle(tmp_path)
    assert [t.random_baseline for t in tasks] == [0.25, 0.5, 0.0]
    device = torch.device("cpu")
    oracle = core_eval.evaluate_core(
        Oracle(tiny_tokenizer, tmp_path, tasks), tiny_tokenizer, tmp_path, device
    )
    assert oracle["core"] == 1.0 and all(r["centered"] == 1.0 for r in oracle["tasks"].values())

    def constant(input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, tiny_tokenizer.vocab_size)

    constant_results = core_eval.evaluate_core(constant, tiny_tokenizer, tmp_path, device)
    assert {label: r["accuracy"] for label, r in constant_results["tasks"].items()} == {
        "mc": 0.25,  # always the first choice: right a quarter of the time
        "schema": 0.5,
        "lm": 0.0,
    }
    assert constant_results["core"] == 0.0


def test_the_kits_bundle_has_20_of_the_22_tasks_and_says_so(data_kit: Path) -> None:
    bundle = data_kit / "eval_bundle"
    tasks = core_eval.load_tasks(bundle)
    assert len(tasks) == 22 and len(core_eval.load_tasks(bundle, "core_offline.yaml")) == 20
    baselines = {t.label: t.random_baseline for t in tasks}
    assert baselines["commonsense_qa"] == 0.20 and baselines["bigbench_language_identification"] == 0.091
    assert sorted(core_eval.missing_task_files(bundle, "core.yaml")) == [
        "reading_comprehension/coqa.jsonl",
        "reading_comprehension/squad.jsonl",
    ]
    notes = []
    assert core_eval.choose_config(bundle, "core.yaml", notes.append) == "core_offline.yaml"
    assert "lacks reading_comprehension/squad.jsonl" in notes[0] and "not comparable" in notes[0]


@pytest.mark.parametrize(
    ("label", "rows", "keys"),
    [
        ("hellaswag_zeroshot", 10_042, {"query", "choices", "gold"}),
        ("jeopardy", 2_117, {"context", "continuation"}),
        ("winograd", 273, {"context_options", "continuation", "gold"}),
        ("copa", 100, {"query", "choices", "gold"}),
        ("bigbench_repeat_copy_logic", 32, {"context", "continuation"}),
        ("boolq", 3_270, {"query", "choices", "gold"}),
    ],
)
def test_kit_tasks_load_with_their_schemas_and_counts(
    data_kit: Path, label: str, rows: int, keys: set
) -> None:
    bundle = data_kit / "eval_bundle"
    (task,) = [t for t in core_eval.load_tasks(bundle, "core_offline.yaml") if t.label == label]
    examples = core_eval.load_examples(bundle, task)
    assert len(examples) == rows and keys <= set(examples[0])
    assert len(core_eval.load_examples(bundle, task, max_per_task=7)) == 7
