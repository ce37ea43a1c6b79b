"""
Chat SFT: supervised fine-tuning of the mid model on a task mixture (sft.yaml: SmolTalk, MMLU ×3,
GSM8K ×4, identity, spelling; add your own with a jsonl entry), conversations packed without cutting
any, loss on the assistant's tokens only, ChatCORE measured as it trains. The loop is in supervised.py.

    python -m trainer.chat_sft --run demo                        # from runs/demo/mid, latest step
    python -m trainer.chat_sft --run demo --source base          # skip midtraining
    torchrun --standalone --nproc_per_node=8 -m trainer.chat_sft -- --run demo
"""

from trainer import supervised


def main(argv: list[str] | None = None) -> dict:
    return supervised.main("sft", argv)


if __name__ == "__main__":
    main()
