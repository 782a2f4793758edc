"""What the router streams back: `Delta`, a request's new tokens with their text, and `TextStream`, the
incremental detokenization that makes the text."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from baton.engine.logprobs import TokenLogprobs
from baton.engine.request import FinishReason

log = logging.getLogger(__name__)


@dataclass
class Delta:
    """New tokens of a request and their text; the last event carries the finish reason and the usage."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token, when the request asks
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # on the first event, when asked (first: None)
    index: int = 0  # the choice it belongs to (n > 1)


class TokenTexts:
    """Each token's own text and bytes, for logprobs: a token alone may be part of a UTF-8 character, so its
    bytes come from the tokenizer's byte-level alphabet where it has one (GPT-2 style), and its text is those
    bytes decoded with replacement characters, as OpenAI shows such tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._byte_of = {ch: b for b, ch in bytes_to_unicode().items()}  # GPT-2's printable stand-ins for bytes

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one per router, lives as long as it
    def bytes(self, token: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str) and piece and all(ch in self._byte_of for ch in piece):
            return bytes(self._byte_of[ch] for ch in piece)
        return str(self.tokenizer.decode([token])).encode("utf-8")  # not byte-level: its decoded text

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", errors="replace")


class TextStream:
    """Incremental detokenization. Text is released only once it is final: an incomplete UTF-8 tail (decoded
    as '\\ufffd') and a tail that may be the start of a stop string are held back until the next tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = ""  # text released so far

    def decode(self) -> str:
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def add(self, token_ids: list[int]) -> str:
        """Take new tokens; return the text they release."""
        self.ids += token_ids
        text = self.decode().rstrip("\ufffd")
        for s in self.stop:  # the worker ends the request at a stop string: never release one
            if s in text:
                text = text[: text.index(s)]
        text = text[: len(text) - self._stop_prefix(text)]
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self, stop_text: str | None) -> str:
        """The rest of the text once the request ended; `stop_text` is the whole text when a stop string ended it."""
        final = stop_text if stop_text is not None else self.decode()
        if not final.startswith(self.sent):
            log.warning("streamed text %r is not a prefix of the final text %r", self.sent, final)
            return ""
        delta, self.sent = final[len(self.sent) :], final
        return delta

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that a stop string begins with."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest


