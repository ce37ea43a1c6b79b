"""
Chat tasks: datasets turned into conversations (the format SFT trains on and chat_eval prompts with),
and how a reply is graded. Rows are shuffled with numpy's default_rng(42), which is what Hugging Face
`datasets.shuffle(seed=42)` does, so `--max-problems N` picks the same problems as the reference.

- ARC-Easy, ARC-Challenge, MMLU: categorical; the reply is one answer letter.
- GSM8K: generative; the calculator tool is written in the solutions (<<expr=result>>), and the answer
  is the number after "####".
- HumanEval: generative; the reply's program runs against the task's tests in the sandbox.
- SpellingBee: generative, synthetic; count a letter in a word from the word list, spelled out and then
  checked with the calculator's str.count (and SimpleSpelling, spelling a word, for training mixtures);
  both generated exactly as nanochat 348fbb3 does.
"""

import functools
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
    return gsm8k_task(shuffled(task_data.task_rows(settings, "gsm8k", split)))


def gsm8k_task(rows: list[dict[str, str]]) -> Task:
    """GSM8K-style rows ({"question", "answer"}, the answer's last line "#### <number>") as the task."""
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


@functools.cache
def say_once(message: str) -> None:
    print(message, flush=True)


def grade_program(conversation: Conversation, reply: str) -> bool:
    """pass@1: the reply's program, with the prompt's imports, passes the task's check() in the sandbox.
    Where the sandbox lacks a containment layer it refuses to run the program: the problem is graded an
    error (never a pass), and why is said once."""
    imports = leading_imports(conversation["messages"][0]["content"])
    test = f"{conversation['test']}\ncheck({conversation['entry_point']})\n"
    program = f"{imports}\n\n{extract_program(reply)}\n\n{test}"
    result = run_program(program, timeout=5.0)
    if result.refused:
        say_once(f"HumanEval: every program is graded an error: {result.error}")
    return result.passed


# -- SpellingBee and SimpleSpelling --------------------------------------------------------------
# As nanochat 348fbb3 generates them (tasks/spellingbee.py): the same words, questions, replies and
# random draws for a given seed, so a mixture's spelling rows and the SpellingBee eval are the reference's.

LETTERS = "abcdefghijklmnopqrstuvwxyz"
QUOTES = ["", "'", '"']
TEST_SEED_OFFSET = 10_000_000  # more than the word list's 370k words: train and test seeds never meet
SPELLING_QUESTIONS = [
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "Count the number of {letter} in {word}",
    "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}",
    "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}",
    "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}",
    "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}",
    "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}",
    "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}",
    "Count all the {letter} in {word}",
    "How many times is {letter} in {word}",
    "Number of {letter} in {word}",
    "Total count of {letter} in {word}",
    "How many {letter} does {word} have",
    "How many {letter} does {word} contain",
    "What's the number of {letter} in {word}",
    "{word} has how many {letter}",
    "In {word}, count the {letter}",
    "How many {letter} appear in {word}",
    "Count the {letter} in {word}",
    "Give me the count of {letter} in {word}",
    "How many instances of {letter} in {word}",
    "Show me how many {letter} are in {word}",
    "Calculate the number of {letter} in {word}",
    "¿Cuántas {letter} hay en {word}?",
    "¿Cuántas veces aparece {letter} en {word}?",
    "Cuenta las {letter} en {word}",
    "¿Cuántas letras {letter} tiene {word}?",
    "{word}中有多少个{letter}",
    "{word}里有几个{letter}",
    "数一下{word}中的{letter}",
    "{word}这个词里有多少{letter}",
    "{word}에 {letter}가 몇 개 있나요",
    "{word}에서 {letter}의 개수는",
    "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    "Combien de {letter} dans {word}",
    "Combien de fois {letter} apparaît dans {word}",
    "Compte les {letter} dans {word}",
    "Wie viele {letter} sind in {word}",
    "Wie oft kommt {letter} in {word} vor",
    "Zähle die {letter} in {word}",
    "{word}に{letter}は何個ありますか",
    "{word}の中に{letter}がいくつ",
    "{word}に{letter}が何回出てくる",
]


def spelling_seed(index: int, split: str) -> int:
    return index if split == "train" else TEST_SEED_OFFSET + index


def spelling_bee_conversation(words: list[str], seed: int) -> Conversation:
    """Count a letter in a word: the reply spells the word out, counts along, checks the count with the
    calculator and ends with '#### N'. The random draws come in the reference's order."""
    rng = random.Random(seed)
    word = rng.choice(words)
    letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)  # 10%: maybe absent
    count = word.count(letter)
    template = rng.choice(SPELLING_QUESTIONS)
    if rng.random() < 0.3:
        template = template.lower()  # people who do not press shift
    letter_quote, word_quote = rng.choice(QUOTES), rng.choice(QUOTES)
    question = template.format(
        letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}"
    )
    if rng.random() < 0.5:
        question += "?"
    # No space between a position and its letter ("3:r"): " r" and "r" are different tokens.
    counted, running = "", 0
    for position, char in enumerate(word, 1):
        running += char == letter
        counted += f"{position}:{char}" + (f" hit! count={running}" if char == letter else "") + "\n"
    manual = (
        f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach "
        f"first.\n\nFirst spell the word out:\n{word}:{','.join(word)}\n\nThen count the occurrences of "
        f"'{letter}':\n{counted}\nThis gives us {running}."
    )
    parts = [
        {"type": "text", "text": manual},
        {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
    ]
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]
    return {"messages": messages, "answer": str(count)}


def spelling_bee(settings: TrainerSettings, size: int = 256, split: str = "test") -> Task:
    """SpellingBee: `size` letter-counting problems (the reference evaluates 256 of the test split)."""
    words = task_data.words(settings)
    conversations = [spelling_bee_conversation(words, spelling_seed(i, split)) for i in range(size)]
    return Task("SpellingBee", "generative", 0.0, conversations)


def simple_spelling(settings: TrainerSettings, size: int, split: str = "train") -> list[Conversation]:
    """SimpleSpelling: 'Spell the word: apple' → 'apple:a,p,p,l,e', the part of SpellingBee that is hard
    for a small model (how a token maps to its letters), over-represented on purpose in midtraining.
    Words are drawn from the list shuffled with Random(42), another order than SpellingBee's."""
    words = list(task_data.words(settings))
    random.Random(42).shuffle(words)
    conversations = []
    for index in range(size):
        word = random.Random(spelling_seed(index, split)).choice(words)
        messages = [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{','.join(word)}"},
        ]
        conversations.append({"messages": messages})
    return conversations


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
