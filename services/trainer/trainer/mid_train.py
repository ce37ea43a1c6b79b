"""
Midtraining: the base model learns the chat format, multiple choice, the calculator tool, who it is and
letter counting from a task mixture (mid.yaml), loss on the assistant's tokens only. The loop is in
supervised.py.

    python -m trainer.mid_train --run demo                       # from runs/demo/base, latest step
    python -m trainer.mid_train --run demo --num-iterations 100 --mixture my_mixture.yaml
    torchrun --standalone --nproc_per_node=8 -m trainer.mid_train -- --run demo
"""

from trainer import supervised


def main(argv: list[str] | None = None) -> dict:
    return supervised.main("mid", argv)


if __name__ == "__main__":
    main()
