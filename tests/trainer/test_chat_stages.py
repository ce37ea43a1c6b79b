"""The chat stages of both recipes: each group's LR as the reference computes it, exact resume of mid,
both SFTs and RL on the data kit, what each stage learns (SFT the assistant's tokens, the classic mid
every token), and the current pipeline tok → base → sft → rl end to end, then a chat."""

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_base_train import run_until_sigterm

from trainer import (
    base_train,
    chat_rl,
    chat_sft,
    checkpoint,
    mid_train,
    scaling,
    supervised,
    tok_train,
    training,
)
from trainer.chat_format import render_conversation
from trainer.gpt import GPT
from trainer.optim import MuonAdamW
from trainer.tokenizer import Tokenizer

from conftest import copy_tokenizer
from support import PYTHON, service_env

# -- Each stage's LRs, as the reference computes them --------------------------------------------------
# The base run a chat stage starts from, as base_train saves it: its flags' raw LRs (0.02, 0.3, 0.008,
# 0.5) and its batch factor √(B/2^19), which no chat stage of the reference carries over.
BASE_RUNS = {  # name: (model config, the base run's recipe)
    "d4 CPU": (
        scaling.model_config(4, 8192, 512, head_dim=64),
        training.Recipe(512, 8, 4096, math.sqrt(4096 / 2**19), 0.02, 0.3, 0.008, 0.5),
    ),
    "d20": (
        scaling.model_config(20, 32768, 2048),
        training.Recipe(2048, 32, 2**20, math.sqrt(2**20 / 2**19), 0.02, 0.3, 0.008, 0.5),
    ),
}


def reference_lrs(
    width: int, lrs: tuple[float, float, float, float], value_embeds: float, frac: float
) -> dict:
    """setup_optimizer (nanochat/gpt.py at both commits) for (unembedding, embedding, matrix, scalar) LRs:
    AdamW LRs of lm_head and embeddings × (width/768)^−½, value embeddings × `value_embeds` of that (92d63d4
    halves them, 348fbb3 does not), resid scalars × 0.01, smear/backout 0.2 (92d63d4); then every group ×
    init_lr_frac, as each chat script does."""
    unembedding, embedding, matrix, scalar = lrs
    d = (width / 768) ** -0.5
    return {
        "lm_head": unembedding * d * frac,
        "embedding": embedding * d * frac,
        "value_embeds": embedding * d * value_embeds * frac,
        "resid": scalar * 0.01 * frac,
        "x0": scalar * frac,
        "smear_backout": 0.2 * frac,
        "matrices": matrix * frac,
    }


# (program, recipe): the reference's LRs, value-embedding share, init_lr_frac, and (progress at a later
# step, the LR multiplier there).
CHAT_STAGE_LRS = {
    # 92d63d4 scripts/chat_sft.py: embedding/unembedding/matrix LRs from the base run's user_config (its raw
    # flags), scalar_lr not passed (0.5); init_lr_frac 0.8; warmdown 0.5 to 0: at 80% of the run 0.4.
    ("chat_sft", "current"): ((0.008, 0.3, 0.02, 0.5), 0.5, 0.8, (0.8, 0.4)),
    # 348fbb3 scripts/mid_train.py: its own flags 0.004/0.2/0.02 (scalar 0.5), init_lr_frac 1.0; constant
    # to 80%, then linear to 0: at 90%, 0.5.
    ("mid_train", "classic"): ((0.004, 0.2, 0.02, 0.5), 1.0, 1.0, (0.9, 0.5)),
    # 348fbb3 scripts/chat_sft.py: the same flags × 0.02, lrm = 1 − step/num_iterations: step 30 of 40, 0.25.
    ("chat_sft", "classic"): ((0.004, 0.2, 0.02, 0.5), 1.0, 0.02, (0.75, 0.25)),
}


def meta_model(base: str) -> GPT:
    with torch.device("meta"):  # shapes only: a d20 without its memory
        return GPT(BASE_RUNS[base][0])


def stage_optimizer(program: str, recipe: str, base: str) -> tuple[supervised.Stage, object, MuonAdamW]:
    """A stage's flags (defaults), and its optimizer as the program builds it from BASE_RUNS[base]."""
    args = supervised.build_parser(program).parse_args(["--recipe", recipe] if program == "chat_sft" else [])
    stage = supervised.resolve_stage(program, args)
    lrs = supervised.stage_recipe(stage, BASE_RUNS[base][1], args).learning_rates()
    return stage, args, training.build_optimizer(meta_model(base), lrs, 0.0, args.init_lr_frac, stage.recipe)


def stage_lrs(program: str, recipe: str, base: str, progress: float) -> dict[str, float]:
    """Each group's LR at `progress` through a stage, as the program sets it."""
    stage, args, optimizer = stage_optimizer(program, recipe, base)
    supervised.apply_schedules(stage, optimizer, round(40 * progress), progress, args)
    return named_lrs(optimizer)


def named_lrs(optimizer) -> dict[str, float]:
    """Group name → LR, the Muon groups (one per matrix shape, all alike) as 'matrices'."""
    lrs = {}
    for group in optimizer.param_groups:
        name = "matrices" if group["kind"] == "muon" else group["name"]
        assert lrs.get(name, group["lr"]) == group["lr"]
        lrs[name] = group["lr"]
    return lrs


@pytest.mark.parametrize("base", list(BASE_RUNS))
@pytest.mark.parametrize(("program", "recipe"), list(CHAT_STAGE_LRS))
def test_a_chat_stages_lrs_are_the_references_at_the_start_and_later(
    program: str, recipe: str, base: str
) -> None:
    lrs, value_embeds, frac, (progress, lrm) = CHAT_STAGE_LRS[(program, recipe)]
    expected = reference_lrs(BASE_RUNS[base][0].n_embd, lrs, value_embeds, frac)
    assert stage_lrs(program, recipe, base, 0.0) == pytest.approx(expected, rel=1e-12)
    later = {name: lr * lrm for name, lr in expected.items()}
    assert stage_lrs(program, recipe, base, progress) == pytest.approx(later, rel=1e-12)


def test_the_current_sfts_lrs_are_the_base_runs_flags_without_its_batch_factor() -> None:
    """At d20 the base run trained with LRs × √2 (B = 2^20): the SFT starts from the flags' 0.3, not 0.42."""
    lrs = stage_lrs("chat_sft", "current", "d20", 0.0)
    assert lrs["embedding"] == pytest.approx(0.3 * (1280 / 768) ** -0.5 * 0.8, rel=1e-12)  # 0.1859
    assert lrs["matrices"] == pytest.approx(0.016, rel=1e-12)
    base = training.build_optimizer(GPT_on_meta("d20"), BASE_RUNS["d20"][1].learning_rates(), 0.0)
    assert named_lrs(base)["matrices"] == pytest.approx(
        0.02 * math.sqrt(2), rel=1e-12
    )  # what it must not take


def GPT_on_meta(base: str) -> GPT:
    with torch.device("meta"):
        return GPT(BASE_RUNS[base][0])


@pytest.mark.parametrize("base", list(BASE_RUNS))
@pytest.mark.parametrize("recipe", ["current", "classic"])
def test_rls_lrs_are_its_own_flags_at_five_percent_decaying_to_zero(base: str, recipe: str) -> None:
    """chat_rl.py (92d63d4 and 348fbb3 alike): LRs 0.004/0.2/0.02 (scalar 0.5), none inherited,
    × init_lr_frac 0.05, lrm = 1 − step/num_steps; the value embeddings' share is its version's."""
    args = chat_rl.parser.parse_args(["--recipe", recipe])
    optimizer = chat_rl.build_optimizer(meta_model(base), args)
    expected = reference_lrs(
        BASE_RUNS[base][0].n_embd, (0.004, 0.2, 0.02, 0.5), 0.5 if recipe == "current" else 1.0, 0.05
    )
    assert named_lrs(optimizer) == pytest.approx(expected, rel=1e-12)
    assert chat_rl.apply_lr(optimizer, 45, 60) == 0.25
    assert named_lrs(optimizer) == pytest.approx({k: v * 0.25 for k, v in expected.items()}, rel=1e-12)


def test_each_version_keeps_its_own_optimizer_settings_and_momentum() -> None:
    """Besides LRs, 348fbb3's setup_optimizer gives every AdamW group betas (0.8, 0.95) and no weight decay
    and NorMuon β2 0.95, where 92d63d4 has its own per group; the classic SFT leaves Muon's momentum at
    0.95, mid and the current SFT ramp it from 0.85."""
    settings = {}
    for program, recipe in CHAT_STAGE_LRS:
        stage, args, optimizer = stage_optimizer(program, recipe, "d4 CPU")
        supervised.apply_schedules(stage, optimizer, 0, 0.0, args)
        groups = {g["name"]: g for g in optimizer.param_groups}
        muon = next(g for g in optimizer.param_groups if g["kind"] == "muon")
        settings[program, recipe] = (
            groups["lm_head"]["betas"],
            groups["embedding"]["weight_decay"],
            muon["beta2"],
            muon["momentum"],
        )
    assert settings["chat_sft", "current"] == ((0.8, 0.96), 0.001, 0.9, 0.85)
    assert settings["mid_train", "classic"] == ((0.8, 0.95), 0.0, 0.95, 0.85)
    assert settings["chat_sft", "classic"] == ((0.8, 0.95), 0.0, 0.95, 0.95)


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
        "  - {source: identity-template, rows: 50}\n"
        "  - {source: simple-spelling, rows: 20}\n"
        "  - {source: spelling-bee, rows: 30}\n"
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


STAGES = {  # name → (program, its folder, its flags)
    "mid": (mid_train.main, "mid", f"--source base {CHAT} --eval-every 2"),
    "sft": (chat_sft.main, "sft", f"--source base {CHAT} --eval-every 2"),
    "sft-classic": (chat_sft.main, "sft", f"--recipe classic --source base {CHAT} --eval-every 2"),
    "rl": (chat_rl.main, "rl", f"--source sft {RL}"),
}


@pytest.mark.parametrize("name", list(STAGES))
def test_n_plus_n_steps_after_resume_equal_2n_steps(
    env: Path, data_kit: Path, tmp_path: Path, name: str
) -> None:
    program, stage, flags = STAGES[name]
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
    straight, resumed = f"{name}-straight", f"{name}-resumed"
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


def momentum_buffers(base: Path, run: str, stage: str, step: int) -> list[torch.Tensor]:
    """The Muon momentum buffers of a checkpoint's optimizer, in group order."""
    state = torch.load(
        checkpoint.step_dir(base / "runs" / run / stage, step) / "rank00.pt", weights_only=True
    )
    return [s["momentum_buffer"] for s in state["optimizer"]["state"].values() if "momentum_buffer" in s]


@pytest.mark.parametrize(("program", "folder", "warm"), [(chat_sft, "sft", True), (mid_train, "mid", False)])
def test_the_current_sft_warm_starts_the_optimizer_from_base_and_the_classic_mid_starts_fresh(
    env: Path, data_kit: Path, tmp_path: Path, program, folder: str, warm: bool
) -> None:
    """One step from the same weights and batch: the only difference a warm start makes to Muon's momentum
    is the base run's buffer × 0.85 (the step-0 momentum: buf ← μ·buf + (1 − μ)·g)."""
    flags = [
        "--source-run",
        "c",
        "--source",
        "base",
        *CHAT.split(),
        "--num-iterations",
        "1",
        "--eval-every",
        "0",
    ]
    flags += ["--mixture", str(small_mixture(tmp_path, data_kit))]
    program.main(["--run", f"{folder}-default", *flags])
    program.main(["--run", f"{folder}-fresh", *flags, "--no-load-optimizer"])
    base = momentum_buffers(env, "c", "base", 6)
    default, fresh = (
        momentum_buffers(env, f"{folder}-default", folder, 1),
        momentum_buffers(env, f"{folder}-fresh", folder, 1),
    )
    for b, d, f in zip(base, default, fresh, strict=True):
        torch.testing.assert_close(d - f, 0.85 * b if warm else torch.zeros_like(b))


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


@pytest.mark.parametrize("program", [chat_sft, mid_train])
def test_sft_learns_the_assistant_tokens_and_the_classic_mid_every_token(
    env: Path, tmp_path: Path, program
) -> None:
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
    run = f"learn-{program.__name__.rsplit('.', 1)[-1]}"
    flags = f"--source base {CHAT} --eval-every 0 --num-iterations 30 --init-lr-frac 0.35"
    program.main(["--run", run, "--source-run", "c", *flags.split(), "--mixture", str(tmp_path / "mix.yaml")])
    folder = "sft" if program is chat_sft else "mid"
    model, _ = checkpoint.load_model(env / "runs" / run / folder, 30, torch.device("cpu"), torch.float32)
    after = assistant_and_user_loss(model.eval(), tokenizer, held_out)
    assert after[0] < before[0] - 2.0, (before, after)  # the reply is learned
    if program is chat_sft:
        assert before[1] - after[1] < (before[0] - after[0]) / 3, (before, after)  # the questions much less
    else:
        assert before[1] - after[1] > (before[0] - after[0]) / 2, (before, after)  # the questions too


def test_minus_one_turns_every_chat_evaluation_off_the_last_step_included(
    env: Path, data_kit: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    flags = "--source base --num-iterations 2 --eval-every -1 --chatcore-every -1"
    mixture = ["--mixture", str(small_mixture(tmp_path, data_kit))]
    summary = chat_sft.main(["--run", "sft-quiet", "--source-run", "c", *flags.split(), *mixture])
    out = capsys.readouterr().out
    assert "evaluation: val bpb off | chat tasks off" in out
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

    def evaluate(task, model, engine, tokenizer, runtime, options, stop) -> float:  # what ChatCORE asks
        asked[task.name] = (options.max_problems, options.max_new_tokens)
        return 0.5

    monkeypatch.setattr(supervised, "evaluate_chat_task", evaluate)
    flags = "--source base --num-iterations 2 --eval-every 0 --chatcore-every 0 --chatcore-max-cat 3"
    mixture = ["--mixture", str(small_mixture(tmp_path, data_kit))]
    summary = chat_sft.main(["--run", "sft-sized", "--source-run", "c", *flags.split(), *mixture])
    out = capsys.readouterr().out
    assert "evaluation: val bpb at the last step | chat tasks at the last step" in out
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


def test_the_current_pipeline_tok_base_sft_rl_then_chat(tmp_path: Path, data_kit: Path, monkeypatch) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(data_kit))
    mixture = f"--mixture {small_mixture(tmp_path, data_kit)}"
    tok_train.main(["--run", "p", "--vocab-size", "1024", "--max-chars", "2000000"])
    base_train.main(["--run", "p", *BASE.split()])
    chatcore = "--chatcore-every 3 --chatcore-max-cat 4 --chatcore-max-sample 1"
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
            *chatcore.split(),
        ]
    )
    rl = chat_rl.main(["--run", "p", *RL.split(), "--num-iterations", "2"])
    assert sft["source"] == "p/base step 6" and sft["recipe"] == "current" and sft["chatcore"] is not None
    assert rl["source"] == "p/sft step 3" and rl["steps"] == 2 and 0 <= rl["pass_at_1"] <= 1
    report = tmp_path / "runs" / "p" / "report"
    assert {"tok_train.json", "base_train.json", "chat_sft.json", "chat_rl.json"} <= {
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
