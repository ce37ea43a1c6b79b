"""The chat stages on the data kit: mid, SFT and RL resume exactly, SFT learns the assistant's tokens
only, and the whole pipeline tok → base → mid → sft → rl runs end to end, then chats."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_base_train import run_until_sigterm

from trainer import base_train, chat_rl, chat_sft, checkpoint, mid_train, supervised, tok_train
from trainer.chat_format import render_conversation
from trainer.tokenizer import Tokenizer

from conftest import copy_tokenizer
from support import PYTHON, service_env

BASE = (
    "--depth 2 --head-dim 64 --max-seq-len 128 --device-batch-size 4 --total-batch-size 1024 "
    "--eval-tokens 2048 --sample-every 0 --core-metric-every -1 --warmup-steps 2 --num-iterations 6 "
    "--eval-every 0"
)
CHAT = "--eval-tokens 1024 --chatcore-every -1 --keep-checkpoints 5"
RL = (
    "--examples-per-step 2 --num-samples 4 --device-batch-size 2 --max-new-tokens 12 --eval-every 2 "
    "--eval-examples 2 --keep-checkpoints 5"
)


def small_mixture(folder: Path, data_kit: Path) -> Path:
    """A quick mixture of every source the kit has."""
    path = folder / "small.yaml"
    path.write_text(
        "train:\n"
        f"  - {{source: jsonl, path: {data_kit / 'sft' / 'customjson_sample.jsonl'}}}\n"
        "  - {source: smoltalk, split: train, rows: 100}\n"
        "  - {source: gsm8k, split: train, rows: 100}\n"
        "  - {source: identity, rows: 50}\n"
        "  - {source: spelling, rows: 50}\n"
        "val:\n"
        "  - {source: smoltalk, split: test, rows: 20}\n"
    )
    return path


@pytest.fixture(scope="module")
def chat_base(kit_base: Path, data_kit: Path) -> Path:
    """Run 'c': the kit tokenizer and a base model trained for 6 steps."""
    copy_tokenizer(kit_base, "c")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOCHAT_BASE_DIR", str(kit_base))
        patch.setenv("NANOCHAT_DATA_DIR", str(data_kit))
        base_train.main(["--run", "c", *BASE.split()])
    return kit_base


@pytest.fixture
def env(chat_base: Path, env: Path) -> Path:
    return env


def weights(base: Path, run: str, stage: str, step: int) -> dict[str, torch.Tensor]:
    return load_file(checkpoint.step_dir(base / "runs" / run / stage, step) / "model.safetensors")


def records(base: Path, run: str, stage: str) -> list[dict]:
    path = base / "runs" / run / stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


STAGES = {  # stage folder → (program, its flags)
    "mid": (mid_train.main, f"--source base {CHAT} --eval-every 2"),
    "sft": (chat_sft.main, f"--source base {CHAT} --eval-every 2"),
    "rl": (chat_rl.main, f"--source sft {RL}"),
}


@pytest.mark.parametrize("stage", ["mid", "sft", "rl"])
def test_n_plus_n_steps_after_resume_equal_2n_steps(
    env: Path, data_kit: Path, tmp_path: Path, stage: str
) -> None:
    program, flags = STAGES[stage]
    mixture = f"--mixture {small_mixture(tmp_path, data_kit)}" if stage != "rl" else ""
    if stage == "rl":  # RL starts from an SFT model
        sft_flags = f"--source base {CHAT} --num-iterations 2 --eval-every 0"
        chat_sft.main(["--run", "c", *sft_flags.split(), "--mixture", str(small_mixture(tmp_path, data_kit))])
    common = [
        "--source-run",
        "c",
        *flags.split(),
        *mixture.split(),
        "--num-iterations",
        "4",
        "--save-every",
        "2",
    ]
    straight, resumed = f"{stage}-straight", f"{stage}-resumed"
    program(["--run", straight, *common])
    out = env / "runs" / straight / stage
    target = env / "runs" / resumed / stage
    shutil.copytree(checkpoint.step_dir(out, 2), checkpoint.step_dir(target, 2))
    shutil.copy(out / "metrics.jsonl", target / "metrics.jsonl")
    program(["--run", resumed, *common, "--resume"])

    a, b = weights(env, straight, stage, 4), weights(env, resumed, stage, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert timeless(records(env, resumed, stage)) == timeless(records(env, straight, stage))
    assert len([r for r in records(env, resumed, stage) if "val_bpb" in r or "pass@1" in r]) == 3  # 0, 2, 4


def timeless(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("dt", "tok_per_s", "mfu")} for r in rows]


def assistant_and_user_loss(
    model, tokenizer: Tokenizer, conversations: list[list[dict]]
) -> tuple[float, float]:
    """Mean loss on the assistant's tokens and on the user's words (everything after BOS that is not the
    assistant's and not a special token)."""
    assistant, user = [], []
    specials = {token for token, size in enumerate(tokenizer.token_bytes()) if size == 0}
    with torch.no_grad():
        for messages in conversations:
            ids, mask = render_conversation(tokenizer, messages)
            losses = torch.nn.functional.cross_entropy(
                model(torch.tensor([ids[:-1]]))[0], torch.tensor(ids[1:]), reduction="none"
            )
            for loss, target, learned in zip(losses.tolist(), ids[1:], mask[1:], strict=True):
                if learned:
                    assistant.append(loss)
                elif target not in specials:
                    user.append(loss)
    return sum(assistant) / len(assistant), sum(user) / len(user)


def test_sft_learns_the_assistant_tokens_and_leaves_the_user_tokens_alone(env: Path, tmp_path: Path) -> None:
    def chat(i: int) -> list[dict]:
        return [
            {"role": "user", "content": f"Tell me the password for door {i}, please."},
            {"role": "assistant", "content": "The password is swordfish and the door is open."},
        ]

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(chat(i)) + "\n" for i in range(200)))
    (tmp_path / "mix.yaml").write_text(
        "train: [{source: jsonl, path: train.jsonl}]\nval: [{source: jsonl, path: train.jsonl, rows: 8}]\n"
    )
    held_out = [chat(i) for i in range(1000, 1010)]
    tokenizer = Tokenizer.load(env / "runs" / "c" / "tokenizer")
    base, _ = checkpoint.load_model(env / "runs" / "c" / "base", 6, torch.device("cpu"), torch.float32)
    before = assistant_and_user_loss(base.eval(), tokenizer, held_out)
    flags = f"--source base {CHAT} --eval-every 0 --num-iterations 30 --init-lr-frac 8"
    chat_sft.main(
        ["--run", "learn", "--source-run", "c", *flags.split(), "--mixture", str(tmp_path / "mix.yaml")]
    )
    model, _ = checkpoint.load_model(env / "runs" / "learn" / "sft", 30, torch.device("cpu"), torch.float32)
    after = assistant_and_user_loss(model.eval(), tokenizer, held_out)
    assert after[0] < before[0] - 2.0, (before, after)  # the reply is learned
    assert before[1] - after[1] < (before[0] - after[0]) / 3, (before, after)  # the questions much less


def test_minus_one_turns_every_chat_evaluation_off_the_last_step_included(
    env: Path, data_kit: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    flags = "--source base --num-iterations 2 --eval-every -1 --chatcore-every -1"
    mixture = ["--mixture", str(small_mixture(tmp_path, data_kit))]
    summary = chat_sft.main(["--run", "sft-quiet", "--source-run", "c", *flags.split(), *mixture])
    out = capsys.readouterr().out
    assert "evaluation: val bpb off | ChatCORE off" in out
    assert not re.search(r"val bpb \d|ARC-Easy|eval budget", out), out
    assert summary["steps"] == 2 and summary["val_bpb"] is None and summary["chatcore"] is None
    assert not [r for r in records(env, "sft-quiet", "sft") if "val_bpb" in r or "chatcore" in r]


def test_off_cuda_chat_evaluations_are_sized_to_the_run_and_a_flag_wins(
    env: Path, data_kit: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 steps of 1,024 tokens, each evaluation at the end only: val bpb may read 2,048 tokens, ChatCORE's
    five tasks 2,048 tokens of work (one 512-token reply per generative task at least); a given
    --chatcore-max-cat wins."""
    asked = {}

    def evaluate(task, model, engine, tokenizer, runtime, options) -> float:  # what ChatCORE asks of a task
        asked[task.name] = (options.max_problems, options.max_new_tokens)
        return 0.5

    monkeypatch.setattr(supervised, "evaluate_chat_task", evaluate)
    flags = "--source base --num-iterations 2 --eval-every 0 --chatcore-every 0 --chatcore-max-cat 3"
    mixture = ["--mixture", str(small_mixture(tmp_path, data_kit))]
    summary = chat_sft.main(["--run", "sft-sized", "--source-run", "c", *flags.split(), *mixture])
    out = capsys.readouterr().out
    assert "evaluation: val bpb at the last step | ChatCORE at the last step" in out
    assert (
        "eval budget: --eval-tokens 2,048 (sized to this cpu run: the 2,048 tokens trained per evaluation"
        in out
    )
    assert "eval budget: --chatcore-max-cat 3 (given)" in out
    assert "eval budget: --chatcore-max-sample 1 (sized to this cpu run" in out
    assert asked == {
        "ARC-Easy": (3, 512),
        "ARC-Challenge": (3, 512),
        "MMLU": (3, 512),
        "GSM8K": (1, 512),
        "HumanEval": (1, 512),
    }
    assert summary["val_bpb"] is not None and summary["chatcore"] is not None


def test_pipeline_tok_base_mid_sft_rl_then_chat(tmp_path: Path, data_kit: Path, monkeypatch) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(data_kit))
    mixture = f"--mixture {small_mixture(tmp_path, data_kit)}"
    tok_train.main(["--run", "p", "--vocab-size", "1024", "--max-chars", "2000000"])
    base_train.main(["--run", "p", *BASE.split()])
    mid_train.main(
        ["--run", "p", *CHAT.split(), *mixture.split(), "--num-iterations", "3", "--eval-every", "0"]
    )
    sft = chat_sft.main(
        [
            "--run",
            "p",
            *CHAT.split(),
            *mixture.split(),
            "--num-iterations",
            "3",
            "--eval-every",
            "0",
            "--chatcore-every",
            "3",
            "--chatcore-max-cat",
            "4",
            "--chatcore-max-sample",
            "1",
        ]
    )
    rl = chat_rl.main(["--run", "p", *RL.split(), "--num-iterations", "2"])
    assert sft["source"] == "p/mid step 3" and sft["chatcore"] is not None
    assert rl["source"] == "p/sft step 3" and rl["steps"] == 2 and 0 <= rl["pass_at_1"] <= 1
    report = tmp_path / "runs" / "p" / "report"
    assert {"tok_train.json", "base_train.json", "mid_train.json", "chat_sft.json", "chat_rl.json"} <= {
        p.name for p in report.iterdir()
    }
    assert "![reward](reward.png)" in (report / "report.md").read_text()

    env = service_env(NANOCHAT_BASE_DIR=str(tmp_path), NANOCHAT_DATA_DIR=str(data_kit))
    once = subprocess.run(
        [PYTHON, "-m", "trainer.chat_cli", "--run", "p", "-i", "rl", "-p", "Hello!", "-m", "8"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert once.returncode == 0 and once.stdout.strip(), once.stderr
    chat = subprocess.run(
        [PYTHON, "-m", "trainer.chat_cli", "--run", "p", "-m", "8"],
        input="Hi\n/clear\nWho are you?\n/quit\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("Assistant:") == 2 and "(new conversation)" in chat.stdout


def test_sigterm_saves_a_chat_stage_and_resume_continues(env: Path, data_kit: Path, tmp_path: Path) -> None:
    mixture = small_mixture(tmp_path, data_kit)
    command = [
        *(PYTHON, "-m", "trainer.chat_sft", "--run", "c-signal", "--source-run", "c", "--source", "base"),
        *CHAT.split(),
        *("--mixture", str(mixture), "--num-iterations", "400", "--eval-every", "0", "--save-every", "0"),
    ]
    process_env = service_env(NANOCHAT_BASE_DIR=str(env), NANOCHAT_DATA_DIR=str(data_kit))
    output = run_until_sigterm(command, process_env, tmp_path / "first.log", after="step 3 (")
    out = env / "runs" / "c-signal" / "sft"
    (first,) = checkpoint.list_steps(out)
    assert 3 <= first < 400 and "stopped at step" in output and "resume with --resume" in output
    output = run_until_sigterm(
        [*command, "--resume"], process_env, tmp_path / "second.log", after=f"step {first + 2} ("
    )
    assert f"resumed from {checkpoint.step_dir(out, first)}" in output and "step 1 (" not in output
    assert checkpoint.list_steps(out)[-1] > first
