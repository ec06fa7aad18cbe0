"""From a stream of token ids to a stream of text: incremental detokenisation and stop strings.

Text that could still turn into a stop string is held back until it cannot, so a caller never
sees part of a stop string; generation ends as soon as one appears.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from dymoe.engine.tokenizer import StreamDecoder, Tokenizer


def hold_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` may be the beginning of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class StopState:
    """Set by :func:`stream_text` when a stop string ended the text."""

    def __init__(self) -> None:
        self.stopped_by: str | None = None


def stream_text(
    tokenizer: Tokenizer, token_ids: Iterable[int], stops: tuple[str, ...] = (), state: StopState | None = None
) -> Iterator[str]:
    """Yield text pieces for ``token_ids``; stop (closing the id stream) at the first stop string."""
    decoder = StreamDecoder(tokenizer)
    pending = ""
    ids = iter(token_ids)
    for token in ids:
        pending += decoder.push(token)
        hits = [(pending.find(s), s) for s in stops if s and s in pending]
        if hits:
            cut, stop = min(hits)
            if cut:
                yield pending[:cut]
            if state is not None:
                state.stopped_by = stop
            close = getattr(ids, "close", None)
            if close:
                close()
            return
        keep = hold_back(pending, stops)
        if len(pending) > keep:
            yield pending[: len(pending) - keep]
            pending = pending[len(pending) - keep :]
    pending += decoder.flush()
    if pending:
        yield pending
