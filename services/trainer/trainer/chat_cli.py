"""
Chat with a trained model in the terminal: replies stream as they are generated, the conversation is
kept across turns, calculator calls are shown with their results.

    python -m trainer.chat_cli --run demo                 # the sft model, interactive
    python -m trainer.chat_cli --run demo -i rl -p "What is 12 * 7?"     # one answer, then exit

Commands: /clear starts a new conversation, /quit (or Ctrl-D) leaves.
"""

import argparse
import sys

import torch

from trainer import checkpoint
from trainer.chat_format import Message, render_for_completion
from trainer.common import add_run_flag
from trainer.engine import Engine, TextStream
from trainer.runtime import add_runtime_flags, setup_runtime
from trainer.settings import TrainerSettings
from trainer.tokenizer import Tokenizer

parser = argparse.ArgumentParser(description="Chat with a trained model in the terminal.")
add_run_flag(parser)
parser.add_argument(
    "-i", "--source", choices=["mid", "sft", "rl"], default="sft", help="stage (default: sft)"
)
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
parser.add_argument("-p", "--prompt", default=None, help="answer this one message and exit")
parser.add_argument(
    "-t", "--temperature", type=float, default=0.6, help="sampling temperature (default: 0.6)"
)
parser.add_argument("-k", "--top-k", type=int, default=50, help="sample from the k likeliest (default: 50)")
parser.add_argument(
    "-m", "--max-tokens", type=int, default=512, help="tokens per reply at most (default: 512)"
)
parser.add_argument("--seed", type=int, default=42, help="sampling seed of the first reply (default: 42)")
add_runtime_flags(parser)


def reply(engine: Engine, messages: list[Message], args: argparse.Namespace, seed: int) -> list[dict]:
    """Stream the assistant's next message to stdout; return it as message parts (text, python,
    python_output), so the next turn's prompt has the tool calls as the model wrote them."""
    tokenizer = engine.tokenizer
    prompt = render_for_completion(tokenizer, messages)
    room = engine.model.config.sequence_len - len(prompt)
    if room <= 0:
        raise ValueError("the conversation is longer than the model's context: /clear to start over")
    opens = {engine.python_start: ("python", "[python: "), engine.output_start: ("python_output", " → ")}
    closes = {engine.python_end: "]", engine.output_end: ""}
    parts: list[dict] = []
    kind, stream, pieces = "text", TextStream(tokenizer), []

    def close_part(next_kind: str, shown: str, cut: bool = False) -> None:
        """End the part; one `cut` at the length limit ends before a character it cut in two."""
        nonlocal kind, stream, pieces
        pieces.append("" if cut else stream.flush())
        if "".join(pieces) or kind != "text":
            parts.append({"type": kind, "text": "".join(pieces)})
        print(pieces[-1] + shown, end="", flush=True)
        kind, stream, pieces = next_kind, TextStream(tokenizer), []

    options = {"temperature": args.temperature, "top_k": args.top_k, "seed": seed}
    for (token,) in engine.generate(prompt, max_tokens=min(args.max_tokens, room), **options):
        if token.id in engine.stop_tokens:
            close_part("text", "\n")
            return parts
        if token.id in opens:
            close_part(*opens[token.id])
        elif token.id in closes:
            close_part("text", closes[token.id])
        else:
            pieces.append(stream.push(token.id))
            print(pieces[-1], end="", flush=True)
    close_part("text", "\n", cut=True)
    return parts


def main(argv: list[str] | None = None) -> None:
    args = parser.parse_args(argv)
    runtime = setup_runtime(args.device, args.dtype)
    settings = TrainerSettings()
    folder = settings.run_dir(args.run) / args.source
    step = checkpoint.resolve_step(folder, args.step)
    model, _ = checkpoint.load_model(folder, step, runtime.device, runtime.dtype)
    model.eval()
    engine = Engine(model, Tokenizer.load(settings.run_dir(args.run) / "tokenizer"))
    messages: list[Message] = []
    if args.prompt is not None:
        reply(engine, [{"role": "user", "content": args.prompt}], args, args.seed)
        return
    print(f"nanochat {args.run}/{args.source} step {step} | /clear: new conversation, /quit: leave")
    turn = 0
    while True:
        try:
            line = input("\nYou: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/clear":
            messages = []
            print("(new conversation)")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        print("\nAssistant: ", end="", flush=True)
        try:
            with torch.inference_mode():
                answer = reply(engine, messages, args, args.seed + turn)
        except ValueError as error:
            messages.pop()
            print(f"\n({error})", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": answer})
        turn += 1


if __name__ == "__main__":
    main()
