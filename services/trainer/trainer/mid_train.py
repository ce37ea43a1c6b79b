"""
Midtraining, the classic recipe's second stage (nanochat 348fbb3): the base model learns the chat format,
multiple choice, the calculator tool, who it is, spelling and letter counting from a task mixture
(mid.yaml), every token of it learned. The loop is in supervised.py.

    python -m trainer.mid_train --run demo                       # from runs/demo/base, latest step
    python -m trainer.mid_train --run demo --num-iterations 100 --mixture my_mixture.yaml
    torchrun --standalone --nproc_per_node=8 -m trainer.mid_train -- --run demo
"""

from trainer import supervised


def main(argv: list[str] | None = None) -> dict:
    return supervised.main("mid_train", argv)


if __name__ == "__main__":
    main()
