"""
Chat tasks: datasets turned into conversations (the format SFT trains on and chat_eval prompts with),
and how a reply is graded. Rows are shuffled with numpy's default_rng(42), which is what Hugging Face
`datasets.shuffle(seed=42)` does, so `--max-problems N` picks the same problems as the reference.

- ARC-Easy, ARC-Challenge, MMLU: categorical; the reply is one answer letter.
- GSM8K: generative; the calculator tool is written in the solutions (<<expr=result>>), and the answer
  is the number after "####".
- HumanEval: generative; the reply's program runs against the task's tests in the sandbox.
- SpellingBee: generative, synthetic; count a letter in a word from the word list, spelled out and then
  checked with the calculator's str.count.
"""

import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer import task_data
from trainer.execution import run_program
from trainer.settings import TrainerSettings

Conversation = dict[str, Any]  # {"messages": [...], plus what grading needs}


def shuffled(rows: list[dict], seed: int = 42) -> list[dict]:
    """The rows in the order datasets.Dataset.shuffle(seed) gives."""
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


def render_multiple_choice(question: str, letters: list[str], choices: list[str]) -> str:
    """The letter follows its choice with no space ("- Paris=A"): small models bind a choice to its
    letter better that way, and the reply "A" is then the very token seen in the prompt."""
    options = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices, strict=True))
    instruction = "Respond only with the letter of the correct answer."
    return f"Multiple Choice question: {question}\n{options}\n{instruction}"


@dataclass
class Task:
    name: str
    eval_type: str  # "categorical" (compare answer-letter logits) or "generative" (sample, then grade)
    baseline: float  # the accuracy of guessing: 1/4 for four choices, 0 for open answers
    conversations: list[Conversation]

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> Conversation:
        return self.conversations[index]

    def evaluate(self, conversation: Conversation, reply: str) -> bool:
        return GRADERS[self.name](conversation, reply)


def letter_question(
    question: str, letters: list[str], choices: list[str], answer: str, **extra
) -> Conversation:
    messages = [
        {"role": "user", "content": render_multiple_choice(question, letters, choices)},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages, "letters": letters, **extra}


def arc(settings: TrainerSettings, level: str, split: str = "test") -> Task:
    rows = shuffled(task_data.task_rows(settings, f"arc-{level.lower()}", split))
    conversations = [
        letter_question(row["question"], row["choices"]["label"], row["choices"]["text"], row["answerKey"])
        for row in rows
    ]
    return Task(f"ARC-{level}", "categorical", 0.25, conversations)


MMLU_LETTERS = ["A", "B", "C", "D"]


def mmlu(settings: TrainerSettings, split: str = "test") -> Task:
    rows = shuffled(task_data.task_rows(settings, "mmlu", split))
    conversations = [
        letter_question(
            row["question"], MMLU_LETTERS, row["choices"], MMLU_LETTERS[row["answer"]], subject=row["subject"]
        )
        for row in rows
    ]
    return Task("MMLU", "categorical", 0.25, conversations)


def grade_letter(conversation: Conversation, reply: str) -> bool:
    return reply == conversation["messages"][-1]["content"]


# -- GSM8K ---------------------------------------------------------------------------------------

GSM_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(text: str) -> str | None:
    """The number after '####', commas dropped (the official GSM8K normalisation)."""
    match = GSM_ANSWER.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def solution_parts(answer: str) -> list[dict[str, str]]:
    """A GSM8K solution as assistant parts: text, and each <<expr=result>> as a calculator call and its
    output."""
    parts = []
    for piece in re.split(r"(<<[^>]+>>)", answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expression, _, result = piece[2:-2].rpartition("=") if "=" in piece else (piece[2:-2], "", "")
            parts += [{"type": "python", "text": expression}, {"type": "python_output", "text": result}]
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def gsm8k(settings: TrainerSettings, split: str = "test") -> Task:
    rows = shuffled(task_data.task_rows(settings, "gsm8k", split))
    conversations = [
        {
            "messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": solution_parts(row["answer"])},
            ],
            "answer": extract_answer(row["answer"]),
        }
        for row in rows
    ]
    return Task("GSM8K", "generative", 0.0, conversations)


def grade_number(conversation: Conversation, reply: str) -> bool:
    return extract_answer(reply) == conversation["answer"]


# -- HumanEval -----------------------------------------------------------------------------------


def leading_imports(prompt: str) -> str:
    """The import lines a HumanEval prompt starts with (a reply often leaves them out)."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(reply: str) -> str:
    """The first ```python (or plain ```) block of a reply, else the whole reply."""
    blocks = re.findall(r"```(?:python)?\s*\n(.*?)\n```", reply, re.DOTALL)
    return (blocks[0] if blocks else reply).strip()


def humaneval(settings: TrainerSettings) -> Task:
    rows = shuffled(task_data.task_rows(settings, "humaneval", "test"))
    conversations = [
        {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
            ],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }
        for row in rows
    ]
    return Task("HumanEval", "generative", 0.0, conversations)


def grade_program(conversation: Conversation, reply: str) -> bool:
    """pass@1: the reply's program, with the prompt's imports, passes the task's check() in the sandbox."""
    imports = leading_imports(conversation["messages"][0]["content"])
    test = f"{conversation['test']}\ncheck({conversation['entry_point']})\n"
    program = f"{imports}\n\n{extract_program(reply)}\n\n{test}"
    return run_program(program, timeout=5.0).passed


# -- SpellingBee ---------------------------------------------------------------------------------

SPELLING_TEMPLATES = [
    "How many {letter} are in {word}",
    "How many times does {letter} appear in {word}",
    "Count the {letter} in {word}",
    "How many letters {letter} does the word {word} have",
    "In {word}, how many {letter} are there",
    "Number of {letter} in {word}",
    "{word}: how many {letter}",
    "What is the count of {letter} in the word {word}",
    "¿Cuántas {letter} hay en {word}",
    "Combien de {letter} y a-t-il dans {word}",
    "Wie viele {letter} hat {word}",
    "{word}里有几个{letter}",
]
TEST_SEED_OFFSET = 10_000_000  # more than the word list's 370k words: train and test seeds never meet


def spelling_conversation(words: list[str], seed: int) -> Conversation:
    """One synthetic letter-counting conversation; the reply spells the word out, counts along, checks
    the count with the calculator and ends with '#### N'."""
    rng = random.Random(seed)
    word = rng.choice(words)
    letter = rng.choice(word) if rng.random() < 0.9 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    count = word.count(letter)
    template = rng.choice(SPELLING_TEMPLATES)
    quote = rng.choice(["", "'", '"'])
    question = template.format(letter=f"{quote}{letter}{quote}", word=f"{quote}{word}{quote}")
    question = (question.lower() if rng.random() < 0.3 else question) + ("?" if rng.random() < 0.5 else "")
    # No space between a position and its letter ("3:r"): " r" and "r" are different tokens.
    steps, running = [], 0
    for position, char in enumerate(word, 1):
        running += char == letter
        steps.append(f"{position}:{char}" + (f" hit! count={running}" if char == letter else ""))
    spelled = "\n".join(steps)
    reasoning = (
        f"Counting '{letter}' in '{word}'. Spelled out:\n{word}:{','.join(word)}\n\n{spelled}\n\n"
        f"That makes {running}. Checking with Python:\n\n"
    )
    parts = [
        {"type": "text", "text": reasoning},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nPython agrees: {count}.\n\n#### {count}"},
    ]
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]
    return {"messages": messages, "answer": str(count)}


def spelling_bee(settings: TrainerSettings, size: int = 256, split: str = "test") -> Task:
    words = task_data.words(settings)
    offset = TEST_SEED_OFFSET if split == "test" else 0
    return Task(
        "SpellingBee", "generative", 0.0, [spelling_conversation(words, offset + i) for i in range(size)]
    )


GRADERS = {
    "ARC-Easy": grade_letter,
    "ARC-Challenge": grade_letter,
    "MMLU": grade_letter,
    "GSM8K": grade_number,
    "HumanEval": grade_program,
    "SpellingBee": grade_number,
}
CHAT_TASKS = {
    "ARC-Easy": lambda settings: arc(settings, "Easy"),
    "ARC-Challenge": lambda settings: arc(settings, "Challenge"),
    "MMLU": mmlu,
    "GSM8K": gsm8k,
    "HumanEval": humaneval,
    "SpellingBee": spelling_bee,
}
# ChatCORE as published (nanochat's d20 report card): the mean centred accuracy over these five.
PUBLISHED_CHATCORE_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"]
