"""
What a client may ask for: one pydantic model per job kind, unknown fields forbidden and every value
bounded, so a bad request is refused with the field's name before anything reaches the queue. A spec
also knows the trainer program that runs it; each config field is that program's flag of the same name.
"""

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

# Same rule as the trainer's --run: a run name is one safe path component.
RunName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="run folder name")]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenizerConfig(StrictModel):
    vocab_size: int = Field(
        default=32768, ge=265, le=2**17, description="vocab incl. 256 byte tokens and the 9 special tokens"
    )
    max_chars: int = Field(
        default=2_000_000_000, ge=10_000, le=100_000_000_000, description="characters of text to train on"
    )
    doc_cap: int = Field(
        default=10_000, ge=100, le=1_000_000, description="crop each document to this length"
    )


class JobSpec(StrictModel):
    """Fields every job kind has; subclasses add `kind`, `config` and the program that runs them."""

    program: ClassVar[str]  # the trainer module run as `python -m <program>`
    report_section: ClassVar[str]  # runs/<run>/report/<section>.json becomes the job's result

    run: RunName = "default"

    def arguments(self) -> list[str]:
        """The program's command line: --run plus one --flag per config field."""
        args = ["--run", self.run]
        for name, value in self.config.model_dump().items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        return args


class TokenizerJob(JobSpec):
    program: ClassVar[str] = "trainer.tok_train"
    report_section: ClassVar[str] = "tok_train"

    kind: Literal["tokenizer"]
    config: TokenizerConfig = TokenizerConfig()


AnyJobSpec = TokenizerJob
JOB_SPEC = TypeAdapter(AnyJobSpec)
