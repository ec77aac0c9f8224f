"""Tokenizer from a local Hugging Face tokenizer directory, through the `tokenizers` library (no transformers).

The loader tokenizes the text between special tokens run by run and inserts the special tokens as ids. That is
the same split the Hugging Face tokenizer makes (added special tokens are cut out of the string before the
pre-tokenizer runs), so the ids equal those of `tokenizer(rendered_text)`; tests/data/test_processor_parity.py checks it
against transformers' processor with the real Qwen2 tokenizer files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tokenizers import Tokenizer as _HFTokenizer

# Control tokens the loader needs, by role.
SPECIAL_TOKENS = {
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "endoftext": "<|endoftext|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image_pad": "<|image_pad|>",
    "video_pad": "<|video_pad|>",
    "object_ref_start": "<|object_ref_start|>",
    "object_ref_end": "<|object_ref_end|>",
    "box_start": "<|box_start|>",
    "box_end": "<|box_end|>",
}


@dataclass(frozen=True)
class SpecialIds:
    im_start: int
    im_end: int
    endoftext: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int
    object_ref_start: int
    object_ref_end: int
    box_start: int
    box_end: int


_CACHE: dict[str, Tokenizer] = {}


class Tokenizer:
    """A Qwen2-family tokenizer loaded from `DIR/tokenizer.json`.

    `encode_runs(texts)` returns, per text, the encoding (ids and each token's character span), which the
    renderer uses to decide which tokens fall inside supervised text.
    """

    def __init__(self, path: str) -> None:
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            where = "" if os.path.isabs(path) else (f" (a relative path, resolved against the working directory "
                                                    f"{os.getcwd()} to {os.path.abspath(path)})")
            raise ValueError(
                f"no tokenizer.json at {path!r}{where}: data.tokenizer must be a local Hugging Face tokenizer "
                "directory (e.g. a downloaded Qwen2-VL checkpoint) holding tokenizer.json"
            )
        self.path = path
        self._tok = _HFTokenizer.from_file(file)
        # Padding/truncation settings in a tokenizer.json would silently change the ids: switch them off.
        self._tok.no_padding()
        self._tok.no_truncation()
        ids = {}
        missing = []
        for name, text in SPECIAL_TOKENS.items():
            i = self._tok.token_to_id(text)
            if i is None:
                missing.append(text)
            ids[name] = i
        if missing:
            raise ValueError(f"tokenizer {path!r} lacks Qwen2-VL's control tokens {missing}: use Qwen2-VL's tokenizer")
        self.special = SpecialIds(**ids)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        """A process-wide cached instance (loading Qwen's 151k-entry tokenizer.json takes about a second; forked
        DataLoader workers inherit the parent's instance)."""
        tok = _CACHE.get(path)
        if tok is None:
            tok = _CACHE[path] = cls(path)
        return tok

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (special-token strings inside it become their ids, as in transformers)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_runs(self, texts: list[str]) -> list:
        """`tokenizers.Encoding` of each text, in one batched call (`.ids`; `.token_to_chars(i)` gives a token's
        character span, which the renderer queries only at supervision boundaries)."""
        if not texts:
            return []
        return self._tok.encode_batch(texts, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def __getstate__(self) -> dict:
        # Rebuilt from its path in worker processes (a Rust tokenizer object does not need to be pickled).
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(Tokenizer.load(state["path"]).__dict__)
