"""Turning a model's streamed answer into thinking chunks and a judgement, without I/O.

The decision tag: a line ``DECISION: approve`` (or ``reject`` / ``abstain``), anywhere in
the answer, case-insensitive, markdown around it tolerated (``**Decision:** Reject.``),
past tenses accepted (``approved``). The last such line counts; every such line is removed
from the judgement text. An answer without one has no decision (the agent does not vote).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

__all__ = ["NO_EXPLANATION", "ThoughtBatcher", "split_decision"]

_DECISION_LINE = re.compile(
    r"^[\s>*_#`\-]*decision[\s*_`]*[:=][\s*_`\[\"']*(approve|reject|abstain)(?:e?d)?\b[^\n]*(?:\n|$)",
    re.IGNORECASE | re.MULTILINE,
)
_SENTENCE_END = re.compile(r"[.!?…][\"')\]*_]*[ \t]+")
_BLANK_LINES = re.compile(r"\n{3,}")

#: The judgement text of an answer that was nothing but its decision line.
NO_EXPLANATION = "(no explanation given)"


def split_decision(answer: str) -> tuple[str, str | None]:
    """The answer without its decision lines, and the decision (None when it has none)."""
    found = list(_DECISION_LINE.finditer(answer))
    if not found:
        return answer.strip(), None
    decision = found[-1].group(1).lower()
    text = _BLANK_LINES.sub("\n\n", _DECISION_LINE.sub("", answer)).strip()
    return text or NO_EXPLANATION, decision


class ThoughtBatcher:
    """Groups streamed tokens into readable chunks.

    A chunk ends after its last newline, or after a sentence end and the space following
    it once it has ``min_sentence_chars``, or near ``max_chars`` (after a space when there
    is one), or once its first token is ``max_delay_s`` old (checked as tokens arrive).
    Whitespace is never a chunk of its own: it goes with the next one, and trailing
    whitespace is dropped. Otherwise the chunks, concatenated, are the tokens given.
    """

    def __init__(
        self,
        max_chars: int = 80,
        max_delay_s: float = 0.1,
        min_sentence_chars: int = 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_chars = max_chars
        self.max_delay_s = max_delay_s
        self.min_sentence_chars = min_sentence_chars
        self._clock = clock
        self._buffer = ""
        self._started = 0.0

    def add(self, text: str) -> list[str]:
        """Buffer ``text``; return the chunks now ready to send (often none)."""
        if not text:
            return []
        now = self._clock()
        if not self._buffer:
            self._started = now
        self._buffer += text
        ready: list[str] = []
        while (cut := self._cut(now)) > 0:
            ready.append(self._buffer[:cut])
            self._buffer = self._buffer[cut:]
            self._started = now
        return ready

    def flush(self) -> str | None:
        """Whatever is buffered (the end of the answer), or None."""
        chunk, self._buffer = self._buffer, ""
        return chunk if chunk.strip() else None

    def _cut(self, now: float) -> int:
        """Where the next chunk ends in the buffer; 0 when it should wait for more."""
        buffer = self._buffer
        cut = buffer.rfind("\n") + 1
        if cut and not buffer[:cut].isspace():
            return cut
        sentence = max((m.end() for m in _SENTENCE_END.finditer(buffer)), default=0)
        if len(buffer) >= self.max_chars:
            space = buffer.rfind(" ", self.max_chars // 2, self.max_chars)
            cut = space + 1 if space >= 0 else self.max_chars
        elif sentence >= self.min_sentence_chars:
            cut = sentence
        elif now - self._started >= self.max_delay_s:
            cut = len(buffer)
        else:
            return 0
        return 0 if buffer[:cut].isspace() else cut
