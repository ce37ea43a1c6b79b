"""base_train on the data kit: loss falls, resume is bitwise exact, and saves are crash-safe."""

import json
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer import base_train, checkpoint, fp8, scaling, training
from trainer.gpt import GPT
from trainer.runtime import Runtime
from trainer.tokenizer import Tokenizer

from conftest import copy_tokenizer, http_mirror, write_shards
from support import PYTHON, service_env, wait_until

# A depth-2 model on 128-token rows: each step is a few hundredths of a second on a CPU.
SHAPE = (
    "--depth 2 --head-dim 64 --max-seq-len 128 --device-batch-size 4 --total-batch-size 1024 --warmup-steps 5"
)
TINY = f"{SHAPE} --eval-tokens 4096 --sample-every 0 --core-metric-every -1"


def run_dir(base: Path, run: str) -> Path:
    return base / "runs" / run


def train(base: Path, run: str, flags: str) -> dict:
    """base_train.main for `run` (given the shared tokenizer) with the tiny config plus `flags`."""
    copy_tokenizer(base, run)
    return base_train.main(["--run", run, *TINY.split(), *flags.split()])


def metrics(base: Path, run: str) -> list[dict]:
    return [
        json.loads(line) for line in (run_dir(base, run) / "base" / "metrics.jsonl").read_text().splitlines()
    ]


def weights(base: Path, run: str, step: int) -> dict[str, torch.Tensor]:
    return load_file(checkpoint.step_dir(run_dir(base, run) / "base", step) / "model.safetensors")


def test_loss_falls_on_real_text(env: Path) -> None:
    summary = train(env, "learn", "--num-iterations 40 --eval-every 20 --matrix-lr 0.04 --weight-decay 0")
    records = metrics(env, "learn")
    losses = [r["loss"] for r in records if "loss" in r]
    bpbs = [r["val_bpb"] for r in records if "val_bpb" in r]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert bpbs[-1] < bpbs[0] - 0.25 and summary["val_bpb"] == pytest.approx(bpbs[-1], abs=1e-4)
    report = run_dir(env, "learn") / "report"
    summary_file = json.loads((report / "base_train.json").read_text())
    assert summary_file["steps"] == 40 and summary_file["depth"] == 2
    card = (report / "report.md").read_text()
    assert "![train_loss](train_loss.png)" in card and "![val_bpb](val_bpb.png)" in card


def test_architecture_switches_and_gqa_train(env: Path) -> None:
    flags = "--no-value-embeds --no-smear --no-backout --n-kv-head 1 --window-pattern SL --softcap 30"
    summary = train(env, "plain", f"--num-iterations 3 --eval-every 0 {flags}")
    # Three steps at this batch's LR scale (0.044) barely move the model from its uniform start.
    assert summary["steps"] == 3 and summary["val_bpb"] == pytest.approx(3.237, abs=0.01)
    meta = json.loads((checkpoint.step_dir(run_dir(env, "plain") / "base", 3) / "meta.json").read_text())
    config = meta["model_config"]
    assert (config["value_embeds"], config["smear"], config["backout"], config["n_kv_head"]) == (
        False,
        False,
        False,
        1,
    )
    model, _ = checkpoint.load_model(run_dir(env, "plain") / "base", 3, torch.device("cpu"), torch.float32)
    assert not model.value_embeds and model.smear_gate is None and model.backout_lambda is None


def test_interrupted_then_resumed_run_equals_uninterrupted_run_bitwise(env: Path) -> None:
    common = "--num-iterations 12 --eval-every 6 --save-every 6 --keep-checkpoints 5"
    train(env, "straight", common)
    # The resumed run starts from the uninterrupted run's step-6 checkpoint and its metrics so far.
    shutil.copytree(
        checkpoint.step_dir(run_dir(env, "straight") / "base", 6),
        checkpoint.step_dir(run_dir(env, "resumed") / "base", 6),
    )
    shutil.copy(run_dir(env, "straight") / "base" / "metrics.jsonl", run_dir(env, "resumed") / "base")
    train(env, "resumed", f"{common} --resume")
    straight, resumed = weights(env, "straight", 12), weights(env, "resumed", 12)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    def losses(run: str) -> list[tuple]:
        return [(r["step"], r["loss"], r["lrm"]) for r in metrics(env, run) if "loss" in r]

    assert len(losses("straight")) == 12 and losses("resumed") == losses("straight")
    # The resumed run starts at an eval step whose record it already has: one record per eval step.
    evals = [(r["step"], r["val_bpb"]) for r in metrics(env, "resumed") if "val_bpb" in r]
    assert [step for step, _ in evals] == [0, 6, 12]
    assert evals == [(r["step"], r["val_bpb"]) for r in metrics(env, "straight") if "val_bpb" in r]


def test_resume_carries_the_loop_state(env: Path) -> None:
    common = "--num-iterations 4 --eval-every 2 --save-every 2"
    train(env, "loop", common)
    out = run_dir(env, "loop") / "base"
    meta_path = checkpoint.step_dir(out, 2) / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert set(meta["loop_state"]) == {
        "val_bpb",
        "min_val_bpb",
        "core",
        "training_time",
        "startup_time",
        "wall_time",
        "evals_pending",
    }
    assert meta["loop_state"]["startup_time"] > 0 and meta["loop_state"]["training_time"] == 0
    # Pretend the first two steps took ten minutes and once reached an excellent bpb.
    meta["loop_state"].update(min_val_bpb=0.5, training_time=600.0, startup_time=7.0)
    meta_path.write_text(json.dumps(meta))
    summary = train(env, "loop", f"{common} --resume-from-step 2")
    assert summary["min_val_bpb"] == 0.5 and summary["val_bpb"] > 0.5
    assert summary["training_minutes"] >= 10 and summary["startup_seconds"] >= 7


def test_float16_trains_on_cpu_with_a_grad_scaler_and_resumes(env: Path) -> None:
    summary = train(env, "half", "--num-iterations 4 --eval-every 4 --dtype float16")
    assert summary["dtype"] == "float16" and summary["steps"] == 4
    bpbs = [r["val_bpb"] for r in metrics(env, "half") if "val_bpb" in r]
    assert len(bpbs) == 2 and bpbs[-1] < bpbs[0]
    step_dir = checkpoint.step_dir(run_dir(env, "half") / "base", 4)
    state = torch.load(step_dir / "rank00.pt", weights_only=True)
    assert state["grad_scaler"]["scale"] == 65536.0
    with pytest.raises(SystemExit, match="trained in float16; resume it with --dtype float16"):
        train(env, "half", "--num-iterations 5 --resume --dtype float32")
    # The scaler's state comes back on resume: a scale set in the checkpoint is the one saved next.
    state["grad_scaler"]["scale"] = 1024.0
    torch.save(state, step_dir / "rank00.pt")
    train(env, "half", "--num-iterations 5 --eval-every 0 --resume --dtype float16")
    next_dir = checkpoint.step_dir(run_dir(env, "half") / "base", 5)
    assert torch.load(next_dir / "rank00.pt", weights_only=True)["grad_scaler"]["scale"] == 1024.0


def test_fp8_trains_like_the_compute_dtype_resumes_bitwise_and_saves_an_ordinary_checkpoint(
    env: Path, capsys: pytest.CaptureFixture
) -> None:
    # d2 (width 128, the smallest a float8 layer may be) at 128 tokens a step: CPUs without float8 or
    # bfloat16 units run _scaled_mm in a scalar loop. fp32 compute for the same reason; on GPUs --fp8
    # runs beside bf16, and tests/trainer/test_fp8.py covers that there. LRs 10× the recipe's, so that
    # 16 steps at this batch's LR scale move the loss.
    common = "--depth 2 --dtype float32 --max-seq-len 64 --device-batch-size 2 --total-batch-size 128"
    common += " --num-iterations 16 --warmup-steps 1 --eval-tokens 1024"
    common += " --embedding-lr 3 --unembedding-lr 0.3 --matrix-lr 0.3 --weight-decay 0"
    common += " --eval-every 0 --save-every 8 --keep-checkpoints 0"
    plain = train(env, "plain", common)
    float8 = train(env, "fp8", f"{common} --fp8")
    assert "fp8: 13 of 15 linear layers train in float8" in capsys.readouterr().out
    assert float8["fp8"] and not plain["fp8"]

    def losses(run: str) -> list[float]:
        return [r["loss"] for r in metrics(env, run) if "loss" in r]

    ours, reference = losses("fp8"), losses("plain")
    assert len(ours) == 16 and sum(ours[-4:]) / 4 < sum(ours[:4]) / 4 - 0.3  # 128-token batches are noisy
    # Like fp32's, step by step, but not fp32's: the matmuls did run in float8.
    assert ours != reference and max(abs(a - b) for a, b in zip(ours, reference, strict=True)) < 0.05
    assert float8["val_bpb"] == pytest.approx(plain["val_bpb"], abs=0.02)

    # Dynamic scaling keeps no state: a resumed --fp8 run continues bitwise.
    shutil.copytree(
        checkpoint.step_dir(run_dir(env, "fp8") / "base", 8),
        checkpoint.step_dir(run_dir(env, "fp8-resumed") / "base", 8),
    )
    train(env, "fp8-resumed", f"{common} --fp8 --resume")
    straight, resumed = weights(env, "fp8", 16), weights(env, "fp8-resumed", 16)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # The checkpoint holds the ordinary fp32 weights: it loads without --fp8 (inference, the chat stages).
    assert straight.keys() == weights(env, "plain", 16).keys()
    assert {t.dtype for name, t in straight.items() if "blocks" in name} == {torch.float32}
    model, _ = checkpoint.load_model(run_dir(env, "fp8") / "base", 16, torch.device("cpu"), torch.bfloat16)
    assert all(type(m) is not fp8.Float8Linear for m in model.modules())


def test_a_flops_budget_sets_the_step_count_unless_num_iterations_is_given(capsys) -> None:
    runtime = Runtime(torch.device("cpu"), torch.float32)
    # The recipe's CPU config: d4, 34,210,512 FLOPs per token, 4,096 tokens a step.
    flags = "--depth 4 --head-dim 64 --max-seq-len 512 --device-batch-size 8 --total-batch-size 4096"
    flags += " --target-flops 5e12"
    _, horizon, _ = base_train.plan(base_train.parser.parse_args(flags.split()), 8192, runtime)
    assert horizon.num_iterations == round(5e12 / (34_210_512 * 4096)) == 36  # 35.68
    assert "training: 36 steps (from --target-flops) × 4,096 tokens" in capsys.readouterr().out
    args = base_train.parser.parse_args([*flags.split(), "--num-iterations", "300"])
    _, explicit, _ = base_train.plan(args, 8192, runtime)
    assert explicit.num_iterations == 300 and explicit.weight_decay == horizon.weight_decay


def test_crash_while_saving_leaves_the_previous_checkpoint_usable(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = "--num-iterations 6 --eval-every 0 --save-every 3"
    real_save_file = checkpoint.save_file
    calls = []

    def crash_on_second_save(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            real_save_file(dict(list(tensors.items())[:2]), path)  # half written, then the process dies
            raise OSError("disk full")
        real_save_file(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", crash_on_second_save)
    with pytest.raises(OSError, match="disk full"):
        train(env, "crash", common)
    out = run_dir(env, "crash") / "base"
    assert checkpoint.list_steps(out) == [3]
    model, meta = checkpoint.load_model(out, 3, torch.device("cpu"), torch.float32)
    assert meta["step"] == 3 and model.config.n_layer == 2
    monkeypatch.setattr(checkpoint, "save_file", real_save_file)
    summary = train(env, "crash", f"{common} --resume")  # picks up at step 3 and finishes
    assert summary["steps"] == 6 and checkpoint.list_steps(out) == [3, 6]
    assert not list(out.glob(".*tmp"))  # the half-written temp folder was cleaned up


def test_a_diverged_run_stops_with_an_error_and_saves_nothing_broken(env: Path) -> None:
    """NaN weights (as a diverged run has) make a NaN loss: the program exits with an error at that step,
    so its job fails and a pipeline stops, and writes no checkpoint, report or metrics of the NaN model."""
    train(env, "nan", "--num-iterations 2 --eval-every 0 --save-every 2")
    out, report = run_dir(env, "nan") / "base", run_dir(env, "nan") / "report" / "base_train.json"
    healthy_report = report.read_text()
    weights_file = checkpoint.step_dir(out, 2) / "model.safetensors"
    tensors = load_file(weights_file)
    tensors["lm_head.weight"] = torch.full_like(tensors["lm_head.weight"], float("nan"))
    save_file(tensors, weights_file)
    with pytest.raises(SystemExit, match=r"step 3: the loss is nan, the run has diverged"):
        train(env, "nan", "--num-iterations 6 --eval-every 0 --save-every 1 --resume")
    assert checkpoint.list_steps(out) == [2]
    assert max(r["step"] for r in metrics(env, "nan")) == 2  # the NaN step is not recorded
    assert report.read_text() == healthy_report


def test_only_the_last_k_checkpoints_are_kept(env: Path) -> None:
    train(env, "keep", "--num-iterations 5 --eval-every 0 --save-every 1 --keep-checkpoints 2")
    assert checkpoint.list_steps(run_dir(env, "keep") / "base") == [4, 5]


def run_until_sigterm(
    command: list[str], env: dict, log: Path, after: str, also: Callable[[], bool] = lambda: True
) -> str:
    """Start base_train, SIGTERM it once `after` is in its output (and `also` holds), return the output
    (exit code 143)."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            ready = lambda: (after in log.read_text() and also()) or process.poll() is not None  # noqa: E731
            wait_until(ready, 120, after)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 143, log.read_text()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
    return log.read_text()


def test_sigterm_saves_a_checkpoint_even_after_the_output_pipe_broke(env: Path, data_kit: Path) -> None:
    """The worker reading the program's output died (its pipe is closed), then SIGTERM arrives."""
    copy_tokenizer(env, "orphan")
    flags = f"--run orphan {TINY} --num-iterations 400 --eval-every 0 --save-every 0"
    process = subprocess.Popen(
        [PYTHON, "-m", "trainer.base_train", *flags.split()],
        env=service_env(NANOCHAT_BASE_DIR=str(env), NANOCHAT_DATA_DIR=str(data_kit)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        for line in process.stdout:
            if b"step 3/400" in line:
                break
        process.stdout.close()  # the reader goes away
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 143
    finally:
        if process.poll() is None:
            process.kill()
    (step,) = checkpoint.list_steps(run_dir(env, "orphan") / "base")
    assert 3 <= step < 400


def test_sigterm_saves_a_checkpoint_and_resume_continues_from_it(
    env: Path, data_kit: Path, tmp_path: Path
) -> None:
    copy_tokenizer(env, "signal")
    out = run_dir(env, "signal") / "base"
    flags = f"--run signal {TINY} --num-iterations 400 --eval-every 0 --save-every 0"
    command = [PYTHON, "-m", "trainer.base_train", *flags.split()]
    process_env = service_env(NANOCHAT_BASE_DIR=str(env), NANOCHAT_DATA_DIR=str(data_kit))
    output = run_until_sigterm(command, process_env, tmp_path / "first.log", after="step 3/400")
    (first,) = checkpoint.list_steps(out)
    assert 3 <= first < 400 and f"checkpoint {checkpoint.step_dir(out, first)}" in output
    assert "stopped at step" in output and "resume with --resume" in output

    output = run_until_sigterm(
        [*command, "--resume"], process_env, tmp_path / "second.log", after=f"step {first + 2}/400"
    )
    assert f"resumed from {checkpoint.step_dir(out, first)}" in output
    assert f"step {first + 1}/400 | loss" in output and "step 1/400 | loss" not in output
    assert checkpoint.list_steps(out)[-1] > first


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--depth", "0"], "argument --depth: 0 is out of range: expected ≥ 1 and ≤ 64"),
        (["--softcap", "0"], "argument --softcap: 0 is out of range: expected > 0 and ≤ 1000"),
        (["--eval-every", "-2"], "argument --eval-every: -2 is out of range: expected ≥ -1 and ≤ 10000000"),
        (["--matrix-lr", "fast"], "argument --matrix-lr: invalid float value: 'fast'"),
    ],
)
def test_a_flag_out_of_its_bounds_is_refused_with_them(argv: list[str], message: str, capsys) -> None:
    """The same bounds as the API's (tests/jobs/test_specs.py), so both refuse the same runs."""
    with pytest.raises(SystemExit) as exit_info:
        base_train.parser.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_minus_one_turns_every_evaluation_off_the_last_step_included(
    env: Path, capsys: pytest.CaptureFixture
) -> None:
    summary = train(
        env, "quiet", "--num-iterations 3 --eval-every -1 --sample-every -1 --core-metric-every -1"
    )
    out = capsys.readouterr().out
    assert "evaluation: val bpb off | CORE off | samples off" in out
    assert not re.search(r"val bpb \d|sample \||CORE \d|eval budget", out), out
    assert summary["steps"] == 3 and summary["val_bpb"] is None and summary["core"] is None
    assert not [r for r in metrics(env, "quiet") if "val_bpb" in r or "core" in r]


def test_off_cuda_evaluations_are_sized_to_the_run_and_printed(
    env: Path, capsys: pytest.CaptureFixture
) -> None:
    """4 steps of 1,024 tokens: val bpb at 0, 2 and 4 may read 4,096 / 3 tokens each, CORE at the end 4,096
    tokens over the kit's 20 tasks (one example each); a given flag wins over the sized default."""
    copy_tokenizer(env, "sized")
    flags = "--num-iterations 4 --eval-every 2 --core-metric-every 0 --sample-every -1"
    summary = base_train.main(["--run", "sized", *SHAPE.split(), *flags.split()])
    out = capsys.readouterr().out
    assert "val bpb every 2 steps from step 0 and at the last: 3 in 4 steps | CORE at the last step" in out
    assert (
        "eval budget: --eval-tokens 1,365 (sized to this cpu run: the 1,365 tokens trained per evaluation"
        in out
    )
    assert "eval budget: --core-metric-max-per-task 1 (sized to this cpu run" in out
    assert [r["step"] for r in metrics(env, "sized") if "val_bpb" in r] == [0, 2, 4]
    assert [r["step"] for r in metrics(env, "sized") if "core" in r] == [4]
    assert summary["core"] is not None
    given = "--num-iterations 2 --eval-every 0 --eval-tokens 2048 --core-metric-every -1 --sample-every -1"
    base_train.main(["--run", "sized", *SHAPE.split(), *given.split()])
    assert "eval budget: --eval-tokens 2,048 (given)" in capsys.readouterr().out


def test_optimizer_groups_scale_every_lr_by_the_batch_but_smear_and_backout() -> None:
    torch.manual_seed(0)
    model = GPT(scaling.model_config(4, vocab_size=8192, sequence_len=512, head_dim=64))
    args = base_train.parser.parse_args([])
    horizon = scaling.horizon(5_242_976, 91_226_976, 10.5, total_batch_size=4096, num_iterations=300)
    optimizer = base_train.build_optimizer(model, args, horizon)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    s, width_scale = (4096 / 2**19) ** 0.5, (256 / 768) ** -0.5
    assert lr_of[id(model.smear_lambda)] == lr_of[id(model.backout_lambda)] == 0.2
    assert lr_of[id(model.smear_gate.weight)] == 0.2
    assert lr_of[id(model.wte.weight)] == pytest.approx(0.3 * width_scale * s)
    assert lr_of[id(model.lm_head.weight)] == pytest.approx(0.008 * width_scale * s)
    assert lr_of[id(model.resid_lambdas)] == pytest.approx(0.5 * 0.01 * s)
    assert lr_of[id(model.x0_lambdas)] == pytest.approx(0.5 * s)
    assert lr_of[id(model.blocks[0].attn.c_q.weight)] == pytest.approx(0.02 * s)


def test_training_time_counts_the_steps_after_the_first_eleven() -> None:
    loop = training.LoopState()
    for step in range(14):
        loop.record_step(step, seconds=float(step))
    assert loop.startup_time == sum(range(11)) and loop.training_time == 11 + 12 + 13


def test_compiled_training_runs_on_the_cpu(env: Path, capsys: pytest.CaptureFixture) -> None:
    summary = train(env, "compiled", "--num-iterations 2 --eval-every 0 --compile")
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["val_bpb"]))
    assert "torch.compile: a trial kernel built" in capsys.readouterr().out


def test_compile_without_a_compiler_stops_before_training_in_one_line(
    env: Path, data_kit: Path, tmp_path: Path
) -> None:
    copy_tokenizer(env, "nocc")
    no_compilers = tmp_path / "bin"  # PATH without gcc, g++ or clang
    no_compilers.mkdir()
    result = subprocess.run(
        [
            PYTHON,
            "-m",
            "trainer.base_train",
            "--run",
            "nocc",
            *TINY.split(),
            "--num-iterations",
            "2",
            "--compile",
        ],
        env=service_env(NANOCHAT_BASE_DIR=str(env), NANOCHAT_DATA_DIR=str(data_kit), PATH=str(no_compilers)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "--compile: no C++ compiler found (looked for g++, clang++): install a C/C++ compiler and Python's "
        "headers (Debian/Ubuntu: apt-get install gcc g++ python3-dev) or pass --no-compile"
    )
    assert "step 1/2" not in result.stdout


def test_a_run_planned_past_the_shards_on_disk_downloads_the_rest_while_it_trains(
    env: Path, data_kit: Path, tmp_path: Path
) -> None:
    """The kit's shards behind a local HTTP mirror stand in for the real dataset's download URL."""
    base, names = tmp_path / "base", sorted(p.name for p in (data_kit / "pretrain").glob("*.parquet"))
    shutil.copytree(run_dir(env, "r") / "tokenizer", run_dir(base, "mirror") / "tokenizer")
    folder = base / "data" / "pretrain"
    # 2,000 steps of 1,024 tokens want every training shard of the kit; none is on disk yet.
    command = [
        PYTHON,
        "-m",
        "trainer.base_train",
        "--run",
        "mirror",
        *TINY.split(),
        "--num-iterations",
        "2000",
    ]
    with http_mirror(data_kit / "pretrain") as (url, requested):
        process_env = service_env(
            NANOCHAT_BASE_DIR=str(base), NANOCHAT_PRETRAIN_URL=url, NANOCHAT_PRETRAIN_LAST_SHARD="7"
        )
        every_shard = lambda: all((folder / name).exists() for name in names)  # noqa: E731
        output = run_until_sigterm(command, process_env, tmp_path / "log", "step 3/2000", also=every_shard)
    assert "data: 7 training shards for 2,048,000 planned tokens" in output
    assert f"2 present, 5 downloading in the background from {url}" in output
    assert sorted(requested) == names  # each fetched once
    assert sorted(p.name for p in folder.iterdir()) == names  # whole files only, no temp file left


def test_a_new_pass_over_the_data_is_logged_and_recorded(
    tmp_path: Path, tiny_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # More short documents than the loader buffers (1,000), about 20 steps' worth.
    documents = [f"note {i}: kato mine rusa lipo" for i in range(1200)]
    write_shards(tmp_path / "kit" / "pretrain", [documents[:550], documents[550:1100], documents[1100:]], 64)
    tiny_tokenizer.save(run_dir(tmp_path / "base", "passes") / "tokenizer")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path / "kit"))
    summary = base_train.main(
        ["--run", "passes", *TINY.split(), "--num-iterations", "30", "--eval-every", "0"]
    )
    out = capsys.readouterr().out
    assert "30,720 planned tokens: about" in out and "the run repeats data" in out
    assert re.search(r"step \d+/30 \| data: pass 2 over the training shards begins \(repeating data\)", out)
    passes = [r["data_pass"] for r in metrics(tmp_path / "base", "passes") if "data_pass" in r]
    assert passes[0] == 2 and summary["data_passes"] == passes[-1]
