"""Token bytes of a tokenizer, and JSON-constrained decoding as an mlx-lm logits processor.

``TokenVocab`` maps every token id to the bytes it adds to the text (for logprobs and for the
grammar). ``JsonLogitsProcessor`` keeps generation inside the JSON grammar: a byte-level
pushdown automaton (``feed``) tracks the text generated so far, and at every step only the tokens
whose bytes keep it alive stay possible, plus end-of-sequence once a complete value stands. Masks
are cached per automaton state, so repeated states (inside strings, between members) cost one
dictionary lookup. MLX is imported inside the functions that need it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

MAX_WHITESPACE_RUN = 16
"""Longest run of whitespace allowed between JSON tokens (stops endless blank output)."""

MAX_DEPTH = 64
"""Deepest nesting of objects and arrays the grammar allows."""

MAX_CACHED_MASKS = 256
"""Masks kept per model (each is one byte per vocabulary entry)."""

_SPM_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


@dataclass(frozen=True)
class TokenVocab:
    """The bytes of every token id, and the ids that are never part of generated text."""

    pieces: list[bytes]
    control_ids: frozenset[int]
    eos_ids: frozenset[int]

    @classmethod
    def build(cls, tokenizer: Any) -> TokenVocab:
        """Read an mlx-lm ``TokenizerWrapper``: byte-level BPE, SentencePiece or (else) one
        ``decode`` per token."""
        from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

        size = len(tokenizer)
        names = tokenizer.convert_ids_to_tokens(list(range(size)))
        detokenizer = tokenizer.detokenizer
        if isinstance(detokenizer, BPEStreamingDetokenizer):
            decoder = _byte_decoder()
            pieces = [
                b"".join(bytes([decoder[c]]) if c in decoder else c.encode() for c in name or "")
                for name in names
            ]
        elif isinstance(detokenizer, SPMStreamingDetokenizer):
            pieces = [
                bytes([int(m.group(1), 16)])
                if (m := _SPM_BYTE.match(name or ""))
                else (name or "").replace("\u2581", " ").encode()
                for name in names
            ]
        else:
            pieces = [tokenizer.decode([i]).encode() for i in range(size)]
        control = set(tokenizer.all_special_ids)
        control.update(
            i for i, added in tokenizer.added_tokens_decoder.items() if getattr(added, "special", 0)
        )
        for attr in ("think_start_tokens", "think_end_tokens", "tool_call_start_tokens"):
            marker = getattr(tokenizer, attr, None)
            if marker and len(marker) == 1:
                control.add(marker[0])
        return cls(pieces, frozenset(control), frozenset(tokenizer.eos_token_ids))

    def text(self, token: int) -> str:
        """The token as text (U+FFFD where it holds part of a UTF-8 character)."""
        return self.piece(token).decode("utf-8", "replace")

    def piece(self, token: int) -> bytes:
        """The token's bytes (empty for ids past the tokenizer, as a padded vocabulary has)."""
        return self.pieces[token] if 0 <= token < len(self.pieces) else b""


# Automaton modes. A state is (mode, stack, aux, whitespace run): ``stack`` holds "o"/"a" for the
# open objects and arrays; ``aux`` is the start constraint (START), the escape position (STR,
# KEY_STR: 0 plain, -1 after a backslash, 1..4 hex digits still due), the number's sub-state
# (NUM) or the rest of a literal (LIT).
START, VALUE, ARRAY_FIRST, OBJECT_FIRST, KEY, COLON, AFTER, STR, KEY_STR, NUM, LIT, DONE = range(12)
State = tuple[int, str, Any, int]

_WHITESPACE = frozenset(b" \t\n\r")
_ESCAPES = frozenset(b'"\\/bfnrt')
_HEX = frozenset(b"0123456789abcdefABCDEF")
_DIGITS = frozenset(b"0123456789")
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
_NUMBER_ACCEPTS = frozenset("ZIFX")


def _number_step(sub: str, b: int) -> str | None:
    """-?(0|[1-9]d*)(.d+)?([eE][+-]?d+)? as sub-states M(inus) Z(ero) I(nt) D(ot) F(rac) E S X."""
    digit = b in _DIGITS
    if sub == "M":
        return ("Z" if b == 0x30 else "I") if digit else None
    if sub in "ZIF":
        if digit and sub != "Z":
            return sub
        if b == 0x2E and sub != "F":
            return "D"
        return "E" if b in (0x65, 0x45) else None
    if sub == "D":
        return "F" if digit else None
    if sub == "E":
        return "S" if b in (0x2B, 0x2D) else ("X" if digit else None)
    return "X" if digit else None  # S, X


def _finish(stack: str) -> State:
    return (DONE, "", None, 0) if not stack else (AFTER, stack, None, 0)


def _open_value(stack: str, b: int) -> State | None:
    if b in (0x7B, 0x5B):  # { [
        if len(stack) >= MAX_DEPTH:
            return None
        return (
            (OBJECT_FIRST, stack + "o", None, 0)
            if b == 0x7B
            else (ARRAY_FIRST, stack + "a", None, 0)
        )
    if b == 0x22:
        return (STR, stack, 0, 0)
    if b == 0x2D:
        return (NUM, stack, "M", 0)
    if b in _DIGITS:
        return (NUM, stack, "Z" if b == 0x30 else "I", 0)
    if b in _LITERALS:
        return (LIT, stack, _LITERALS[b], 0)
    return None


def feed(state: State, b: int) -> State | None:
    """The automaton after byte ``b``, or None when ``b`` cannot continue valid JSON."""
    mode, stack, aux, ws = state
    if mode in (STR, KEY_STR):
        if aux == 0:
            if b == 0x22:
                return (COLON, stack, None, 0) if mode == KEY_STR else _finish(stack)
            if b == 0x5C:
                return (mode, stack, -1, 0)
            return state if b >= 0x20 else None
        if aux == -1:
            return (mode, stack, 4 if b == 0x75 else 0, 0) if b in _ESCAPES or b == 0x75 else None
        return (mode, stack, aux - 1, 0) if b in _HEX else None
    if mode == NUM:
        sub = _number_step(aux, b)
        if sub is not None:
            return (NUM, stack, sub, 0)
        return feed(_finish(stack), b) if aux in _NUMBER_ACCEPTS else None
    if mode == LIT:
        if b != aux[0]:
            return None
        return (LIT, stack, aux[1:], 0) if len(aux) > 1 else _finish(stack)
    if b in _WHITESPACE:
        return (mode, stack, aux, ws + 1) if mode != DONE and ws < MAX_WHITESPACE_RUN else None
    if mode == START:
        if aux != "any" and b != (0x7B if aux == "object" else 0x5B):
            return None
        return _open_value(stack, b)
    if mode in (VALUE, ARRAY_FIRST):
        if mode == ARRAY_FIRST and b == 0x5D:
            return _finish(stack[:-1])
        return _open_value(stack, b)
    if mode in (OBJECT_FIRST, KEY):
        if mode == OBJECT_FIRST and b == 0x7D:
            return _finish(stack[:-1])
        return (KEY_STR, stack, 0, 0) if b == 0x22 else None
    if mode == COLON:
        return (VALUE, stack, None, 0) if b == 0x3A else None
    if mode == AFTER:
        top = stack[-1]
        if b == 0x2C:
            return (KEY, stack, None, 0) if top == "o" else (VALUE, stack, None, 0)
        if b == (0x7D if top == "o" else 0x5D):
            return _finish(stack[:-1])
    return None


def feed_bytes(state: State | None, data: Iterable[int]) -> State | None:
    """The automaton after ``data``, or None once a byte breaks the grammar."""
    for b in data:
        if state is None:
            return None
        state = feed(state, b)
    return state


def start_state(top: str = "any") -> State:
    """The state before any output; ``top`` is ``object``, ``array`` or ``any`` value."""
    return (START, "", top, 0)


def may_end(state: State) -> bool:
    """Whether the text so far is one complete JSON value."""
    mode, stack, aux, _ = state
    return mode == DONE or (mode == NUM and not stack and aux in _NUMBER_ACCEPTS)


@dataclass
class JsonTokenIndex:
    """Per-model tables that make masks cheap: token ids by first byte, and the ids that can sit
    inside a string unchanged (no quote, backslash or control byte)."""

    vocab: TokenVocab
    by_first_byte: dict[int, list[int]] = field(default_factory=dict)
    plain_string_ids: list[int] = field(default_factory=list)
    string_breakers: list[int] = field(default_factory=list)
    _masks: dict[tuple[State, int], Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for token, piece in enumerate(self.vocab.pieces):
            if not piece or token in self.vocab.control_ids:
                continue
            self.by_first_byte.setdefault(piece[0], []).append(token)
            if b'"' in piece or b"\\" in piece or min(piece) < 0x20:
                self.string_breakers.append(token)
            else:
                self.plain_string_ids.append(token)

    def allowed(self, state: State) -> list[int]:
        """The token ids that keep ``state`` valid JSON (end-of-sequence not included)."""
        pieces = self.vocab.pieces
        if state[0] in (STR, KEY_STR) and state[2] == 0:
            breakers = self.string_breakers
            return self.plain_string_ids + [
                t for t in breakers if feed_bytes(state, pieces[t]) is not None
            ]
        firsts = [b for b in self.by_first_byte if feed(state, b) is not None]
        return [
            t
            for b in firsts
            for t in self.by_first_byte[b]
            if feed_bytes(state, pieces[t]) is not None
        ]

    def mask(self, state: State, size: int) -> Any:
        """A boolean ``mx.array`` of ``size`` (the logits' width): True where a token may come."""
        key = (state, size)
        if (cached := self._masks.get(key)) is not None:
            return cached
        import mlx.core as mx
        import numpy as np

        keep = np.zeros(size, dtype=bool)
        ids = [t for t in self.allowed(state) if t < size]
        if may_end(state):
            ids.extend(t for t in self.vocab.eos_ids if t < size)
        keep[ids] = True
        if len(self._masks) >= MAX_CACHED_MASKS:
            self._masks.clear()
        result = self._masks[key] = mx.array(keep)
        return result


class JsonLogitsProcessor:
    """An mlx-lm logits processor that allows only tokens continuing valid JSON.

    mlx-lm calls it with every token so far (prompt included) and the next token's logits; it
    advances its automaton over the newly generated tokens and masks the rest with -inf.
    """

    def __init__(self, index: JsonTokenIndex, prompt_tokens: int, top: str = "any") -> None:
        self._index = index
        self._seen = prompt_tokens
        self.state: State | None = start_state(top)

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx

        vocab = self._index.vocab
        if tokens.size > self._seen:
            for token in tokens[self._seen :].tolist():
                if token in vocab.eos_ids:  # mlx-lm computes one step past the end: unused
                    return logits
                self.state = feed_bytes(self.state, vocab.piece(token))
            self._seen = tokens.size
        if self.state is None:  # only a token outside the mask could do this
            raise RuntimeError("JSON-constrained decoding produced invalid JSON")
        keep = self._index.mask(self.state, logits.shape[-1])
        return mx.where(keep, logits, mx.array(-mx.inf, dtype=logits.dtype))
