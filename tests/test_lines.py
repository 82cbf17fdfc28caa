"""Splitting a child's output into lines, and masking secrets in them."""

from runner.lines import MASK, Redactor
from runner.oskit.splitter import LineSplitter


def split(chunks: list[bytes], max_bytes: int = 1024) -> list[str]:
    splitter = LineSplitter(max_bytes)
    lines = [line for chunk in chunks for line in splitter.feed(chunk)]
    return lines + list(splitter.close())


def test_lines_split_across_chunks() -> None:
    assert split([b"hel", b"lo\nwor", b"ld\n"]) == ["hello", "world"]


def test_partial_last_line_is_kept() -> None:
    assert split([b"a\nno newline at end"]) == ["a", "no newline at end"]


def test_crlf_is_one_line_ending() -> None:
    assert split([b"one\r\ntwo\r", b"\nthree"]) == ["one", "two", "three"]


def test_empty_lines_are_kept() -> None:
    assert split([b"\n\nx\n"]) == ["", "", "x"]


def test_invalid_utf8_is_replaced() -> None:
    assert split([b"ok \xff\xfe end\n"]) == ["ok \ufffd\ufffd end"]


def test_utf8_split_between_chunks_is_decoded_whole() -> None:
    data = "żółw\n".encode()
    assert split([data[:2], data[2:]]) == ["żółw"]


def test_long_line_is_cut_with_a_marker_without_buffering_it() -> None:
    splitter = LineSplitter(1000)
    lines = []
    for _ in range(100):  # 1 MB in 10 kB chunks, no newline yet
        lines += list(splitter.feed(b"x" * 10_000))
        assert len(splitter._buffer) <= 1000
    lines += list(splitter.feed(b"\nnext\n"))
    assert lines[0] == "x" * 1000 + " …[line cut: 999000 more bytes]"
    assert lines[1] == "next"


def test_redactor_masks_each_secret_and_its_url_encoding() -> None:
    redact = Redactor(["ghp_secret/value+1", "sk-other"])
    text = "a ghp_secret/value+1 b ghp_secret%2Fvalue%2B1 c sk-other"
    assert redact(text) == f"a {MASK} b {MASK} c {MASK}"


def test_redactor_prefers_the_longest_secret() -> None:
    redact = Redactor(["abcd", "abcdefgh"])
    assert redact("xabcdefghx") == f"x{MASK}x"


def test_redactor_without_secrets_is_identity() -> None:
    assert Redactor([])("nothing to hide") == "nothing to hide"


def test_redactor_masks_many_lines_at_once_as_each_alone() -> None:
    redact = Redactor(["abcdef", "xyz/1"])
    texts = ["abc", "def", "no secret", "", "1 abcdef 2 abcdef", "xyz%2F1", "tail abc"]
    masked = redact.all(texts)
    assert masked == [redact(text) for text in texts]
    # A secret cut across two lines is two harmless halves: nothing is joined into a match.
    assert masked[:2] == ["abc", "def"]
    assert masked[4:6] == [f"1 {MASK} 2 {MASK}", MASK]
    assert redact.all(["nothing", "here"]) == ["nothing", "here"]


def test_redactor_masks_texts_that_hold_a_nul_one_by_one() -> None:
    # Log lines never hold NUL (the splitter replaces it); a system text might.
    redact = Redactor(["abcdef"])
    texts = ["a\x00abcdef", "abc\x00def", "abcdef"]
    assert redact.all(texts) == [f"a\x00{MASK}", "abc\x00def", MASK]
    with_nul = Redactor(["abc\x00def"])
    assert with_nul.all(["abc", "def", "abc\x00def"]) == ["abc", "def", MASK]
