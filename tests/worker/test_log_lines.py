"""A job's output becomes log lines the way a terminal would show them."""

import io

from worker.tasks import split_lines


class Chunked(io.RawIOBase):
    """A pipe that hands out its bytes in the given chunks, like a child process writing in bursts."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)

    def read1(self, size: int = -1) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def lines(*chunks: bytes) -> list[str]:
    return list(split_lines(Chunked(list(chunks))))


def test_newlines_split_and_partial_lines_are_joined() -> None:
    assert lines(b"step 1\nste", b"p 2\nlast line without newline") == [
        "step 1",
        "step 2",
        "last line without newline",
    ]


def test_progress_bar_redraws_become_separate_lines() -> None:
    assert lines(b"\r 10%|#\r 50%|###\r100%|#####\n") == [" 10%|#", " 50%|###", "100%|#####"]


def test_a_redraw_is_a_line_as_soon_as_the_next_one_starts() -> None:
    class NoMoreReads(Chunked):
        def read1(self, size: int = -1) -> bytes:
            assert self.chunks, "read past the second redraw: the first one was held back"
            return self.chunks.pop(0)

    stream = split_lines(NoMoreReads([b"step 1\r 10%|#", b"\r 50%|##"]))
    assert [next(stream), next(stream)] == ["step 1", " 10%|#"]


def test_blank_lines_are_kept() -> None:
    assert lines(b"a\n\nb\n") == ["a", "", "b"]


def test_crlf_split_across_reads_is_one_line_break() -> None:
    assert lines(b"windows line\r", b"\nnext\r\n") == ["windows line", "next"]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert lines("naïve ".encode() + b"\xff\n") == ["naïve \ufffd"]
