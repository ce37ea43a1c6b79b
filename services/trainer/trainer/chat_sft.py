"""
Chat SFT, as either reference recipe computes it (the loop is in supervised.py):

- current (nanochat 92d63d4, the default): from the base model, SmolTalk + MMLU ×3 + GSM8K ×4 (sft.yaml)
  packed without cutting a conversation, the base run's LRs × 0.8, ChatCORE measured as it trains;
- classic (348fbb3, `--recipe classic`): from the mid model, a light mixture (sft_classic.yaml: ARC, GSM8K,
  10K SmolTalk, identity, spelling) one conversation a row, LRs × 0.02 decaying to 0.

Only the assistant's tokens are learned; add your own conversations with a jsonl mixture entry.

    python -m trainer.chat_sft --run demo                        # current: from runs/demo/base
    python -m trainer.chat_sft --run demo --recipe classic       # classic: from runs/demo/mid
    torchrun --standalone --nproc_per_node=8 -m trainer.chat_sft -- --run demo
"""

from trainer import supervised


def main(argv: list[str] | None = None) -> dict:
    return supervised.main("chat_sft", argv)


if __name__ == "__main__":
    main()
