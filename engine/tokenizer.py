"""Tokenizer loading, EOS discovery and incremental (streaming) detokenization."""
from __future__ import annotations

import json
from pathlib import Path


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ValueError(
            f"could not load a tokenizer from {model_dir} ({type(e).__name__}: {e}); pass token-id prompts "
            f"with skip_tokenizer_init=True, or add the tokenizer files") from e


def _as_ids(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def eos_token_ids(model_dir: str | Path, hf_config, tokenizer=None) -> set[int]:
    """EOS ids: generation_config.json first (it may list several), then config.json, then the tokenizer."""
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        ids = _as_ids(json.loads(gen.read_text()).get("eos_token_id"))
        if ids:
            return ids
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    ids = _as_ids(getattr(text_config, "eos_token_id", None))
    if ids:
        return ids
    return _as_ids(getattr(tokenizer, "eos_token_id", None)) if tokenizer is not None else set()


class IncrementalDetokenizer:
    """Turns a growing list of generated ids into text deltas. Each delta is the difference between
    decoding a short window with and without the new tokens, so spaces that depend on the previous
    token come out right; a delta ending in an incomplete UTF-8 character waits for the next token."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], context: int = 5):
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids)
        self.prefix_offset = max(len(self.ids) - context, 0)
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]
