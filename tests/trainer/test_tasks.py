"""Chat tasks on the kit: conversations in the chat format, answers graded as the published evals do."""

import functools
import itertools
from dataclasses import replace
from pathlib import Path

import datasets
import pytest

from trainer import tasks
from trainer.chat_format import render_conversation
from trainer.execution import calculator, probe, run_program
from trainer.settings import TrainerSettings
from trainer.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def kit_settings(data_kit: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainerSettings:
    return TrainerSettings(base_dir=tmp_path_factory.mktemp("base"), data_dir=data_kit)


def test_multiple_choice_puts_each_letter_right_after_its_choice() -> None:
    text = tasks.render_multiple_choice("Capital of France?", ["A", "B"], ["Paris", "Rome"])
    assert text == (
        "Multiple Choice question: Capital of France?\n- Paris=A\n- Rome=B\n\n"
        "Respond only with the letter of the correct answer."
    )


@pytest.mark.parametrize(("name", "size"), [("ARC-Easy", 2376), ("ARC-Challenge", 1172), ("MMLU", 14042)])
def test_letter_tasks_grade_the_answer_letter(kit_settings: TrainerSettings, name: str, size: int) -> None:
    task = tasks.CHAT_TASKS[name](kit_settings)
    assert len(task) == size and task.eval_type == "categorical" and task.baseline == 0.25
    conversation = task[0]
    answer = conversation["messages"][-1]["content"]
    assert answer in conversation["letters"] and f"={answer}\n" in conversation["messages"][0]["content"]
    wrong = next(letter for letter in conversation["letters"] if letter != answer)
    assert task.evaluate(conversation, answer) and not task.evaluate(conversation, wrong)


def test_rows_are_shuffled_exactly_as_datasets_shuffle_with_seed_42() -> None:
    rows = [{"i": i} for i in range(500)]
    expected = [r["i"] for r in datasets.Dataset.from_list(rows).shuffle(seed=42)]
    assert [r["i"] for r in tasks.shuffled(rows)] == expected != list(range(500))


def test_gsm8k_answers_are_extracted_from_real_solutions(kit_settings: TrainerSettings) -> None:
    task = tasks.gsm8k(kit_settings)
    assert len(task) == 1319 and all(c["answer"] is not None for c in task.conversations)
    janet = next(c for c in task.conversations if c["messages"][0]["content"].startswith("Janet’s ducks"))
    assert janet["answer"] == "18"
    assert tasks.extract_answer("so she pays 1,250 dollars.\n#### 1,250") == "1250"
    assert tasks.extract_answer("#### -3.5") == "-3.5" and tasks.extract_answer("the answer is 7") is None
    assert task.evaluate(janet, "She makes 9 * 2 = 18.\n#### 18") and not task.evaluate(janet, "#### 17")


def test_gsm8k_calculator_calls_become_python_parts_whose_results_the_calculator_reproduces(
    kit_settings: TrainerSettings,
) -> None:
    parts = tasks.solution_parts("She has 16 - 3 = <<16-3=13>>13 eggs.\n#### 13")
    assert parts == [
        {"type": "text", "text": "She has 16 - 3 = "},
        {"type": "python", "text": "16-3"},
        {"type": "python_output", "text": "13"},
        {"type": "text", "text": "13 eggs.\n#### 13"},
    ]
    for conversation in tasks.gsm8k(kit_settings).conversations[:50]:
        parts = conversation["messages"][1]["content"]
        for call, output in itertools.pairwise(parts):
            if call["type"] == "python" and calculator(call["text"]) is not None:
                assert float(calculator(call["text"])) == pytest.approx(float(output["text"]), abs=0.01)


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(kit_settings: TrainerSettings) -> None:
    task = tasks.humaneval(kit_settings)
    assert len(task) == 164
    for conversation in task.conversations[:3]:
        solution = conversation["messages"][-1]["content"]
        assert task.evaluate(conversation, f"Here you go:\n```python\n{solution}\n```\nDone.")
        assert not task.evaluate(conversation, "def nothing():\n    pass")


def test_humaneval_grades_an_error_where_the_sandbox_lacks_a_layer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    tasks.say_once.cache_clear()
    no_landlock = replace(probe(), landlock_abi=0)
    monkeypatch.setattr(tasks, "run_program", functools.partial(run_program, kernel=no_landlock))
    conversation = {
        "messages": [{"role": "user", "content": "def add(a, b):\n"}],
        "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
        "entry_point": "add",
    }
    right = "def add(a, b):\n    return a + b"
    assert not tasks.grade_program(conversation, right) and not tasks.grade_program(conversation, right)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "HumanEval" in lines[0] and "landlock_filesystem" in lines[0]


def test_spelling_bee_counts_letters_and_checks_with_the_calculator(
    kit_settings: TrainerSettings, tiny_tokenizer: Tokenizer
) -> None:
    task = tasks.spelling_bee(kit_settings, size=20)
    assert len(task) == 20 and task.eval_type == "generative"
    for conversation in task.conversations:
        parts = conversation["messages"][1]["content"]
        (call,) = [p for p in parts if p["type"] == "python"]
        assert calculator(call["text"]) == conversation["answer"]
        assert task.evaluate(conversation, parts[-1]["text"])
        render_conversation(tiny_tokenizer, conversation["messages"])  # a valid conversation
    again = tasks.spelling_bee(kit_settings, size=20)
    assert again.conversations == task.conversations  # seeded: the same test set every time
    train = tasks.spelling_bee(kit_settings, size=20, split="train")
    assert train.conversations != task.conversations


# What nanochat 348fbb3's tasks/spellingbee.py generates for train index 1 from the same word list (run
# from a checkout of that commit): SpellingBee(split="train").get_example(1), SimpleSpelling(...)(1).
REFERENCE_SPELLING_BEE_1 = [
    {"role": "user", "content": "how many times is 'o' in 'cottonize'"},
    {
        "role": "assistant",
        "content": [
            {
                "type": "text",
                "text": "We are asked to find the number 'o' in the word 'cottonize'. Let me try a manual "
                "approach first.\n\nFirst spell the word out:\ncottonize:c,o,t,t,o,n,i,z,e\n\nThen count "
                "the occurrences of 'o':\n1:c\n2:o hit! count=1\n3:t\n4:t\n5:o hit! count=2\n6:n\n7:i\n8:z"
                "\n9:e\n\nThis gives us 2.",
            },
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": "'cottonize'.count('o')"},
            {"type": "python_output", "text": "2"},
            {"type": "text", "text": "\n\nPython gives us 2.\n\nMy final answer is:\n\n#### 2"},
        ],
    },
]
REFERENCE_SIMPLE_SPELLING_1 = [
    {"role": "user", "content": "Spell the word: undangerously"},
    {"role": "assistant", "content": "undangerously:u,n,d,a,n,g,e,r,o,u,s,l,y"},
]


def test_spelling_rows_are_the_references_own(kit_settings: TrainerSettings) -> None:
    assert tasks.spelling_bee(kit_settings, 2, "train")[1]["messages"] == REFERENCE_SPELLING_BEE_1
    assert tasks.simple_spelling(kit_settings, 2, "train")[1]["messages"] == REFERENCE_SIMPLE_SPELLING_1
    test_split = tasks.simple_spelling(kit_settings, 2, "test")
    assert test_split[1]["messages"] != REFERENCE_SIMPLE_SPELLING_1  # test seeds are offset
