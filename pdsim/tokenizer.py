"""A deterministic toy tokenizer: words and punctuation marks map to token ids.

Known words and punctuation have small fixed ids; any other word gets a stable id from its
CRC-32, so the same text gives the same ids in every process. Generated tokens are always
drawn from the fixed vocabulary, so their text is always known.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

BOS_ID = 1
EOS_ID = 2
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|start|>", "<|end|>")
PUNCTUATION = (".", ",", "!", "?", ";", ":", "-", "'", '"', "(", ")")
_WORD_LIST = """
    the of and to in is that it was for on are as with his they at be this from have or by
    one had not but what all were when we there can an your which their said if do will each
    about how up out them then she many some so these would other into has more her two like
    him see time could no make than first been its who now people my made over did down only
    way find use may water long little very after words called just where most know get
    through back much before go good new write our used me man too any day same right look
    think also around another came come work three word must because does part even place well
    such here take why things help put years different away again off went old number great
    tell men say small every found still between name should home big give air line set own
    under read last never us left end along while might next sound below saw something
    thought both few those always looked show large often together asked house world going want
    school important until form food keep children feet land side without boy once animals life
    enough took sometimes four head above kind began almost live page got earth need far hand
    high year mother light parts country father let night following picture being study second
    eyes soon times story boys since white days ever paper hard near sentence better best across
    during today others however sure means knew try told young miles sun ways thing whole hear
    example heard several change answer room sea against top turned learn point city play toward
    five using himself usually money seen car morning river cache token block prefill decode
"""
WORDS = tuple(_WORD_LIST.split())

_FIRST_PUNCT_ID = len(SPECIAL_TOKENS)
_FIRST_WORD_ID = 100
_FIRST_HASHED_ID = 1000
_HASHED_SPAN = (1 << 31) - _FIRST_HASHED_ID
_TOKEN_RE = re.compile(r"<\|[a-z]+\|>|<s>|</s>|\w+|[^\w\s]")
_MAX_LEARNED = 200_000


def _build_tables() -> tuple[dict[str, int], dict[int, str]]:
    to_id: dict[str, int] = {}
    to_text: dict[int, str] = {}
    for i, tok in enumerate(SPECIAL_TOKENS):
        to_id[tok] = i
        to_text[i] = ""
    for i, tok in enumerate(PUNCTUATION):
        to_id[tok] = _FIRST_PUNCT_ID + i
        to_text[_FIRST_PUNCT_ID + i] = tok
    for i, word in enumerate(WORDS):
        to_id[word] = _FIRST_WORD_ID + i
        to_text[_FIRST_WORD_ID + i] = " " + word
    return to_id, to_text


class SimTokenizer:
    """Text <-> token ids; ``apply_chat_template`` renders messages into prompt text.

    Invariant: ``decode(encode(t))`` equals ``t`` up to whitespace for text in the vocabulary;
    other words decode to themselves only if this tokenizer has seen them.
    """

    def __init__(self) -> None:
        self._to_id, self._to_text = _build_tables()
        self._learned: dict[int, str] = {}
        self.generation_ids: tuple[int, ...] = tuple(
            [_FIRST_WORD_ID + i for i in range(len(WORDS))] + [_FIRST_PUNCT_ID, _FIRST_PUNCT_ID + 1]
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [BOS_ID] if add_special_tokens else []
        to_id = self._to_id
        for piece in _TOKEN_RE.findall(text):
            tid = to_id.get(piece)
            if tid is None:
                tid = _FIRST_HASHED_ID + zlib.crc32(piece.encode()) % _HASHED_SPAN
                if len(self._learned) < _MAX_LEARNED:
                    self._learned[tid] = " " + piece
            ids.append(tid)
        return ids

    def token_text(self, token_id: int) -> str:
        """Text of one token; special tokens decode to the empty string."""
        text = self._to_text.get(token_id)
        if text is None:
            text = self._learned.get(token_id, f" <tok{token_id}>")
        return text

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.token_text(t) for t in ids)

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        return [SPECIAL_TOKENS[t] if t < _FIRST_PUNCT_ID else self.token_text(t) for t in ids]

    @staticmethod
    def apply_chat_template(
        messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render chat messages; raises ``ValueError`` on a malformed message."""
        parts: list[str] = []
        for msg in messages:
            if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str):
                raise ValueError("Each message must be an object with a string 'role'.")
            parts.append(f"<|start|>{msg['role']}\n{_content_text(msg.get('content'))}<|end|>\n")
        if add_generation_prompt:
            parts.append("<|start|>assistant\n")
        return "".join(parts)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return " ".join(texts)
    raise ValueError("Message content must be a string or a list of content parts.")
