"""Documents -> windows of tokens -> shards: the plan of a harvest, a pure function of its settings.

Each document is tokenized alone (GPT-2's BPE, nothing added before or after it) and cut into
consecutive windows of ``context`` tokens that do not overlap; the last window of a document holds
what is left (1 to ``context`` tokens) and is kept, so every token of the corpus is run exactly once.
A token's context is therefore the tokens before it in its own window only. ``max_tokens`` ends
the corpus after that many tokens (the last window cut short to make it exact).

Shards take whole windows in corpus order until the next one would overflow ``rows_per_shard``.
The plan depends on nothing else (not the number of processes, not the batch size): shard k is
the same rows whoever computes it, which is what makes resuming and splitting over ranks exact.
"""
from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..corpus import Document


@dataclass(frozen=True)
class Window:
    document: int
    start: int          # position in its document of the first token
    tokens: array       # the token ids, 2 bytes each ("H": GPT-2's 50,257 ids fit)


@dataclass(frozen=True)
class Shard:
    index: int
    windows: list[Window]
    rows: int

    @property
    def tokens(self) -> int:
        return sum(len(w.tokens) for w in self.windows)


def windows(docs: Iterable[Document], encode: Callable[[str], list[int]], context: int,
            max_tokens: int | None = None) -> Iterator[Window]:
    """The windows of every document in order (see the module's docstring for the policy)."""
    left = max_tokens
    for doc in docs:
        ids = encode(doc.text)
        for start in range(0, len(ids), context):
            piece = ids[start:start + context]
            if left is not None:
                piece = piece[:left]
                left -= len(piece)
            yield Window(doc.index, start, array("H", piece))
            if left == 0:
                return


def rows_of(window: Window, keep_positions: str) -> int:
    """Rows a window gives: one per token, or one (its last token) with keep_positions='last'."""
    return len(window.tokens) if keep_positions == "all" else 1


def shards(wins: Iterable[Window], rows_per_shard: int, keep_positions: str) -> Iterator[Shard]:
    """Whole windows, in order, packed into shards of at most ``rows_per_shard`` rows."""
    index, held, rows = 0, [], 0
    for window in wins:
        n = rows_of(window, keep_positions)
        if held and rows + n > rows_per_shard:
            yield Shard(index, held, rows)
            index, held, rows = index + 1, [], 0
        held.append(window)
        rows += n
    if held:
        yield Shard(index, held, rows)
