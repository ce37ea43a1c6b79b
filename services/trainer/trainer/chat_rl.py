"""
Reinforcement learning on GSM8K (RECIPE.md): for each question the policy samples a group of replies
(with the calculator tool), each reply's reward is 1 when its final answer is right, its advantage is
the reward minus the group's mean, and the loss is the token-level policy gradient
−Σ advantage·log p(token) / (tokens sampled). On-policy, so no ratio clipping, and no KL term: the
simple REINFORCE-with-baseline that the reference calls GRPO. Tool outputs are forced, not sampled,
so they are not trained on; the stop token is (it is how a reply ends).

Every --eval-every steps, pass@1…k on the first --eval-examples test questions (k samples each at
temperature 1). `--questions FILE_ID` trains on an uploaded questions file (GSM8K's format) instead, and
evaluates on its val split. Checkpoints resume exactly: the question cursor is saved and every sample's
seed is a function of the step and the question.

    python -m trainer.chat_rl --run demo                           # from runs/demo/sft, latest step
    torchrun --standalone --nproc_per_node=8 -m trainer.chat_rl -- --run demo
"""

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from trainer import checkpoint, eval_budget, training, user_files
from trainer.chat_format import render_for_completion
from trainer.common import (
    BATCH_SIZE,
    EVERY_N_STEPS,
    NEW_TOKENS,
    SAMPLES,
    SEED,
    STEP_COUNT,
    TEMPERATURE,
    TOP_K,
    Bounded,
    add_run_flag,
    print0,
    progress_bar,
)
from trainer.engine import Engine
from trainer.gpt import GPT
from trainer.optim import MuonAdamW
from trainer.report import write_section
from trainer.runtime import (
    Runtime,
    StopRequest,
    add_checkpoint_flags,
    add_runtime_flags,
    end_if_stopped,
    init_wandb,
    until_stopped,
)
from trainer.settings import TrainerSettings
from trainer.tasks import Task, gsm8k, gsm8k_task
from trainer.tokenizer import Tokenizer
from trainer.training import MetricsLog, format_duration, grad_scaler, resume_step, rounded, summary_times

parser = argparse.ArgumentParser(description="Reinforcement learning on GSM8K.")
add_run_flag(parser)
training.add_source_flags(parser, "sft", ("mid", "sft"))
group = parser.add_argument_group("Rollouts")
group.add_argument(
    "--questions",
    type=user_files.file_id,
    default=None,
    help="an uploaded questions file (its id) to train on and evaluate with, its train and val splits, "
    "instead of GSM8K's train and test (default: GSM8K)",
)
group.add_argument(
    "--num-epochs", type=Bounded(int, 1, 1000), default=1, help="passes over GSM8K train (default: 1)"
)
group.add_argument(
    "--num-iterations", type=STEP_COUNT, default=None, help="optimizer steps (default: the epochs' worth)"
)
group.add_argument(
    "--examples-per-step", type=BATCH_SIZE, default=16, help="questions per step, all ranks (default: 16)"
)
group.add_argument(
    "--num-samples", type=SAMPLES, default=16, help="replies sampled per question (default: 16)"
)
group.add_argument(
    "--device-batch-size", type=BATCH_SIZE, default=8, help="replies per forward pass (default: 8)"
)
group.add_argument("--max-new-tokens", type=NEW_TOKENS, default=256, help="tokens per reply (default: 256)")
group.add_argument("--temperature", type=TEMPERATURE, default=1.0, help="sampling temperature (default: 1.0)")
group.add_argument("--top-k", type=TOP_K, default=50, help="sample from the k likeliest tokens (default: 50)")
lr_defaults = {**{name: getattr(training.CHAT_LRS, name) for name in training.LR_NAMES}, "init_lr_frac": 0.05}
training.add_lr_flags(parser, {name: (value, str(value)) for name, value in lr_defaults.items()})
parser.add_argument(
    "--recipe",
    choices=("current", "classic"),
    default="current",
    help="whose optimizer settings: current (92d63d4) or classic (348fbb3) (default: current)",
)
group = parser.add_argument_group("Evaluation and checkpoints")
group.add_argument(
    "--eval-every",
    type=EVERY_N_STEPS,
    default=60,
    help="steps between pass@k evaluations (and one at the end), 0: only at the end, -1: off (default: 60)",
)
group.add_argument(
    "--eval-examples",
    type=Bounded(int, 1, 100_000),
    default=400,
    help="test questions per evaluation (default: 400)",
)
add_checkpoint_flags(group, save_every=60)
group = add_runtime_flags(parser)
group.add_argument("--seed", type=SEED, default=42, help="sampling seed (default: 42)")


@dataclass
class Group:
    """One question's sampled replies as a training batch."""

    inputs: torch.Tensor  # (samples, T)
    targets: torch.Tensor  # (samples, T), −1 on the prompt, forced tool output and padding
    rewards: torch.Tensor  # (samples,)
    lengths: list[int]  # generated tokens per reply

    @property
    def advantages(self) -> torch.Tensor:
        return self.rewards - self.rewards.mean()


@torch.no_grad()
def sample_group(
    engine: Engine,
    prompt: list[int],
    reward: Callable[[str], float],
    args: argparse.Namespace,
    seed: int,
) -> Group:
    """args.num_samples replies to `prompt`, args.device_batch_size at a time (one prefill each)."""
    tokenizer, device = engine.tokenizer, engine.device
    sequences, masks, rewards, lengths = [], [], [], []
    for batch_start in range(0, args.num_samples, args.device_batch_size):
        replies = engine.complete(
            prompt,
            num_samples=min(args.device_batch_size, args.num_samples - batch_start),
            max_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=seed + batch_start,
        )
        for reply in replies:
            sequences.append(prompt + [t.id for t in reply])
            masks.append([0] * len(prompt) + [int(not t.forced) for t in reply])
            rewards.append(float(reward(tokenizer.decode([t.id for t in reply]))))
            lengths.append(len(reply))
    width = max(len(s) for s in sequences)
    pad = tokenizer.bos_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=device)
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device, dtype=torch.bool)
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -1)
    return Group(ids[:, :-1], targets, torch.tensor(rewards, device=device), lengths)


def policy_gradient_backward(
    model: GPT, group: Group, batch_size: int, normalizer: int, scaler: torch.amp.GradScaler | None = None
) -> float:
    """Accumulate the gradient of −Σ advantage·log p over the group's sampled tokens (each forward pass's
    sum divided by its token count and by `normalizer`, the passes per optimizer step). Returns the loss."""
    total = 0.0
    advantages = group.advantages
    for start in range(0, group.inputs.size(0), batch_size):
        inputs, targets = group.inputs[start : start + batch_size], group.targets[start : start + batch_size]
        log_probs = -model(inputs, targets, loss_reduction="none").view_as(inputs)  # 0 where target −1
        objective = (log_probs * advantages[start : start + batch_size, None]).sum()
        loss = -objective / ((targets >= 0).sum().clamp(min=1) * normalizer)
        (scaler.scale(loss) if scaler else loss).backward()
        total += loss.item()
    return total


@torch.no_grad()
def pass_at_k(
    engine: Engine, task: Task, runtime: Runtime, args: argparse.Namespace, stop: StopRequest | None = None
) -> list[float]:
    """pass@1…k (k = device batch size, temperature 1) over the first args.eval_examples test questions;
    a stop request ends it (EvalStopped)."""
    k = args.device_batch_size
    passed = torch.zeros(k, device=runtime.device)
    count = torch.zeros((), device=runtime.device)
    problems = range(runtime.rank, min(args.eval_examples, len(task)), runtime.world_size)
    for index in until_stopped(progress_bar(problems, desc="pass@k", unit="problem", leave=False), stop):
        conversation = task[index]
        replies = engine.complete(
            render_for_completion(engine.tokenizer, conversation["messages"]),
            num_samples=k,
            max_tokens=args.max_new_tokens,
            temperature=1.0,
            top_k=args.top_k,
            seed=index,
        )
        correct = [task.evaluate(conversation, engine.tokenizer.decode([t.id for t in r])) for r in replies]
        for i in range(k):
            passed[i] += any(correct[: i + 1])
        count += 1
    end_if_stopped(stop, runtime.device)
    if runtime.distributed:
        torch.distributed.all_reduce(passed)
        torch.distributed.all_reduce(count)
    return (passed / count.clamp(min=1)).tolist()


def build_optimizer(model: GPT, args: argparse.Namespace) -> MuonAdamW:
    """The flags' LRs × --init-lr-frac (no batch factor, nothing inherited), no Muon weight decay, the
    optimizer settings of --recipe's version."""
    lrs = training.LearningRates(args.matrix_lr, args.embedding_lr, args.unembedding_lr, args.scalar_lr)
    return training.build_optimizer(model, lrs, 0.0, lr_frac=args.init_lr_frac, version=args.recipe)


def apply_lr(optimizer: MuonAdamW, step: int, total: int) -> float:
    """Linear decay from the initial LRs to 0 over the run; returns the multiplier."""
    lrm = 1.0 - step / total
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lrm
    return lrm


@dataclass
class RLLoopState(training.LoopState):
    pass_at_1: float | None = None
    cursor: int = 0  # questions this rank has trained on


def questions(settings: TrainerSettings, file_id: str | None) -> tuple[Task, Task]:
    """The questions trained on and those evaluated: GSM8K's train and test, or an upload's train and val."""
    if file_id is None:
        return gsm8k(settings, "train"), gsm8k(settings, "test")
    try:
        splits = [user_files.split_path(settings, file_id, "questions", split) for split in ("train", "val")]
    except user_files.UnusableFile as error:
        raise SystemExit(f"--questions: {error}") from error
    train_rows, val_rows = (user_files.read_rows(path) for path in splits)
    if not val_rows:
        raise SystemExit(
            f"--questions: {file_id} has no val split to evaluate on (upload it with val_fraction > 0)"
        )
    return gsm8k_task(train_rows), gsm8k_task(val_rows)


def main(argv: list[str] | None = None) -> dict:
    args = parser.parse_args(argv)
    return training.run_training("chat_rl", args, train)


def train(args: argparse.Namespace, settings: TrainerSettings, runtime: Runtime, stop: StopRequest) -> dict:
    if args.examples_per_step % runtime.world_size:
        raise SystemExit(f"--examples-per-step must be a multiple of the {runtime.world_size} processes")
    source = training.open_source(settings, args)
    out_dir = settings.run_dir(args.run) / "rl"
    tokenizer = Tokenizer.load(settings.run_dir(args.run) / "tokenizer")
    start_step = resume_step(args, out_dir)
    resuming = start_step is not None
    weights_from = (out_dir, start_step) if resuming else (source.folder, source.step)
    model, _ = checkpoint.load_model(*weights_from, runtime.device, runtime.dtype)
    optimizer = build_optimizer(model, args)
    scaler = grad_scaler(runtime)
    loop = RLLoopState()
    if resuming:
        checkpoint.load_training_state(out_dir, start_step, optimizer, runtime, scaler)
        loop = RLLoopState(**checkpoint.read_meta(out_dir, start_step)["loop_state"])
        print0(f"resumed from {checkpoint.step_dir(out_dir, start_step)}")
    engine = Engine(model, tokenizer)
    train_task, test_task = questions(settings, args.questions)
    per_rank = args.examples_per_step // runtime.world_size
    total = args.num_iterations or len(train_task) // args.examples_per_step * args.num_epochs
    print0(
        f"source: {source.folder} step {source.step} | {total} steps × {args.examples_per_step} questions × "
        f"{args.num_samples} samples | LRs {args.init_lr_frac} × (matrix {args.matrix_lr}, embedding "
        f"{args.embedding_lr}, unembedding {args.unembedding_lr}, scalar {args.scalar_lr})"
    )
    metrics = MetricsLog(out_dir / "metrics.jsonl", runtime, start_step)
    wandb_run = init_wandb(settings, f"{args.run}-rl", vars(args), runtime)
    start_step = start_step or 0
    invocation_start, wall_before = time.time(), loop.wall_time
    for step in range(start_step, total + 1):
        last, stopping = step == total, runtime.any(stop.requested)
        done_before_checkpoint = resuming and step == start_step and not loop.evals_pending
        with training.evaluations(model, loop):
            if not done_before_checkpoint and eval_budget.due(args.eval_every, step, last, at_start=True):
                model.eval()
                passk = pass_at_k(engine, test_task, runtime, args, stop)
                loop.pass_at_1 = passk[0]
                print0(
                    f"step {step}/{total} | "
                    + " | ".join(f"pass@{k + 1} {p:.4f}" for k, p in enumerate(passk))
                )
                metrics.write({"step": step, **{f"pass@{k + 1}": p for k, p in enumerate(passk)}})
                wandb_run.log({f"pass@{k + 1}": p for k, p in enumerate(passk)}, step=step)
        stopping = stopping or loop.evals_pending
        if step > start_step and (last or stopping or (args.save_every > 0 and step % args.save_every == 0)):
            loop.wall_time = wall_before + time.time() - invocation_start
            meta = {
                "phase": "rl",
                "args": vars(args),
                "source": {"folder": str(source.folder), "step": source.step},
                "loop_state": asdict(loop),
            }
            saved = checkpoint.save(
                out_dir, step, model, optimizer, {}, meta, runtime, args.keep_checkpoints, scaler
            )
            print0(f"step {step}/{total} | checkpoint {saved}")
        if last or stopping:
            break

        t0 = time.time()
        rewards, lengths, loss = [], [], 0.0
        for _ in range(per_rank):
            index = (runtime.rank + loop.cursor * runtime.world_size) % len(train_task)
            conversation = train_task[index]
            prompt = render_for_completion(tokenizer, conversation["messages"])
            model.eval()
            group = sample_group(
                engine,
                prompt,
                lambda reply, c=conversation: train_task.evaluate(c, reply),
                args,
                seed=args.seed + (step * len(train_task) + index) * args.num_samples,
            )
            model.train()
            passes = -(-args.num_samples // args.device_batch_size)
            loss += policy_gradient_backward(model, group, args.device_batch_size, passes * per_rank, scaler)
            rewards.append(group.rewards.mean().item())
            lengths += group.lengths
            loop.cursor += 1
        training.stop_if_diverged(runtime.mean(loss), step + 1)
        lrm = apply_lr(optimizer, step, total)
        training.optimizer_step(optimizer, scaler, runtime)
        dt = time.time() - t0
        loop.record_step(step, dt)
        reward = runtime.mean(sum(rewards) / len(rewards))
        length = runtime.mean(sum(lengths) / len(lengths))
        eta = format_duration((total - step - 1) * dt)
        print0(
            f"step {step + 1}/{total} | reward {reward:.4f} | reply tokens {length:.0f} | loss {loss:.4f} | "
            f"lrm {lrm:.2f} | dt {dt:.1f}s | eta {eta}"
        )
        record = {"step": step + 1, "reward": reward, "loss": loss, "sequence_length": length, "lrm": lrm}
        metrics.write({**record, "dt": dt, "progress": (step + 1) / total})
        wandb_run.log(record, step=step + 1)

    wandb_run.finish()
    if stopping and (not last or loop.evals_pending):
        training.exit_stopped(runtime, step)
    summary = {
        "source": f"{source.folder.parent.name}/{source.folder.name} step {source.step}",
        "steps": step,
        "questions": step * args.examples_per_step,
        "pass_at_1": rounded(loop.pass_at_1),
        **summary_times(loop, wall_before + time.time() - invocation_start),
        **training.runtime_summary(runtime),
    }
    if runtime.is_master:
        write_section(settings, args.run, "chat_rl", summary, vars(args))
    print0("chat_rl done: " + json.dumps(summary, ensure_ascii=False))
    return summary


if __name__ == "__main__":
    main()
