"""Stop strings are looked for only in the newest text. These properties hold the incremental search to
the obvious one over the whole text, for any text growing in any pieces and any stop strings."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from app.ml.row import first_stop, partial_stop, unchanged_prefix

ALPHABET = st.sampled_from("ab\u00e9\ufffd ")  # few letters: stop strings and partial matches happen often
TEXT = st.text(ALPHABET, max_size=40)
STOPS = st.lists(st.text(ALPHABET, min_size=1, max_size=6), min_size=1, max_size=4)


def naive_first_stop(text: str, stops) -> int | None:
    return min((text.find(s) for s in stops if s in text), default=None)


def naive_partial_stop(head: str, stops) -> int:
    return max((n for s in stops for n in range(1, len(s)) if head.endswith(s[:n])), default=0)


@settings(max_examples=300, database=None, derandomize=True)
@given(
    pieces=st.lists(TEXT, min_size=1, max_size=8), rewrite=st.lists(st.booleans(), max_size=8), stops=STOPS
)
def test_searching_the_new_text_finds_what_searching_everything_finds(pieces, rewrite, stops):
    """Text grows piece by piece, and sometimes its last character changes (a completed multi-byte
    character, a decoder's clean-up); the first stop found is the same as a full search's."""
    previous = ""
    for index, piece in enumerate(pieces):
        text = previous + piece
        if index < len(rewrite) and rewrite[index] and previous:
            text = previous[:-1] + "b" + piece
        found = first_stop(text, tuple(stops), checked=unchanged_prefix(previous, text))
        if naive_first_stop(previous, stops) is not None:
            return  # the row would have stopped at the previous piece
        assert found == naive_first_stop(text, stops)
        previous = text


@settings(max_examples=300, database=None, derandomize=True)
@given(head=TEXT, stops=STOPS)
def test_the_held_back_tail_is_the_longest_beginning_of_a_stop_string(head, stops):
    assert partial_stop(head, tuple(stops)) == naive_partial_stop(head, stops)


@settings(max_examples=200, database=None, derandomize=True)
@given(previous=TEXT, text=TEXT)
def test_the_unchanged_prefix_is_the_longest_common_beginning(previous, text):
    shared = unchanged_prefix(previous, text)
    assert text[:shared] == previous[:shared]
    assert shared == min(len(previous), len(text)) or text[shared] != previous[shared]
