"""Iteration-level (continuous) batching for generation: rows join and leave a running batch at
every decoding step.

    batch = DecodeBatch(model)
    batch.add([x1, x2], max_new_tokens=32, on_text=send, is_active=alive)   # prefill, one pass
    while batch:
        finished = batch.step()            # one LLM call for every running row
        batch.add([x3])                    # joins the running rows before the next step

A step picks each row's next token from its last logits; a row that picks a stop token, reaches
its own `max_new_tokens` or whose `is_active(key)` turns false leaves at once (its KV rows are
dropped), and the rest are decoded one position further. `add()` prefills its requests together
and merges their KV cache into the running one: both are left-padded to a common length with
masked zeros, and every row keeps explicit position ids that count its own real tokens, so a
row's logits are what it gets alone. When rows leave, leading columns no row uses any more are
cut from the cache and the mask, so a long-lived batch does not keep paying for departed rows.

The model supplies the two LLM calls as hooks (EmoLlama.prefill / EmoLlama.decode); a subclass
with other position ids (Qwen2.5-VL's 3-D rope) overrides those and nothing here:

    model.prefill(batch) -> Prefill(logits (R, V), cache, mask (R, L), positions (R, 1))
    model.decode(next_ids (R,), cache, mask (R, L + 1), positions (R, 1)) -> logits (R, V)

`positions` is each row's position id of its last token so far (a subclass may keep any
per-row offset in it); the next token is fed at `positions + 1`. This module only ever selects,
concatenates and increments it along the row dimension.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F


class Prefill(NamedTuple):
    """What a prompt pass leaves for decoding (see the module docstring for the shapes)."""
    logits: torch.Tensor     # (R, V): the logits after each row's last prompt token
    cache: Any               # the LLM's KV cache (a transformers DynamicCache), rows in batch order
    mask: torch.Tensor       # (R, L) attention mask, left-padded
    positions: torch.Tensor  # (R, 1) position id of each row's last token


@dataclass(eq=False)
class Row:
    """One request in a DecodeBatch: its limits, callbacks and the tokens it has so far."""
    key: Any                 # the caller's handle, passed back to on_text / is_active
    max_new_tokens: int
    stop: frozenset[int]
    on_text: Callable[[Any, str], None] | None = None
    is_active: Callable[[Any], bool] | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""           # what on_text has been given so far
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" once the row has left

    @property
    def answer(self) -> str:
        return self.text.strip()

    def _emit(self, text: str) -> None:
        if self.on_text and text != self.text:
            self.on_text(self.key, text[len(self.text):] if text.startswith(self.text) else text)
        self.text = text

    def _push(self, token: int, tokenizer) -> None:
        self.tokens.append(token)
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self._emit(text)

    def _finish(self, reason: str, tokenizer) -> None:
        self.finish_reason = reason
        self._emit(tokenizer.decode(self.tokens, skip_special_tokens=True))


class DecodeBatch:
    """The running generation batch of one model version (rows of two versions never mix: their
    adapters differ). Not thread-safe: one thread adds and steps."""

    def __init__(self, model, *, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None):
        self.model = model
        self.sampling = (do_sample, temperature, top_p, generator)
        self.rows: list[Row] = []
        self._logits = self._cache = self._mask = self._positions = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        """Columns of the KV cache and mask now (the longest row, padding included)."""
        return 0 if self._mask is None else self._mask.shape[1]

    @property
    def joinable(self) -> bool:
        """Whether rows can join now (an empty batch always; a running one if its cache can be
        re-padded, see _layers)."""
        return not self.rows or _layers(self._cache) is not None

    @torch.no_grad()
    def add(self, batch: Sequence, keys: Sequence | None = None, *,
            max_new_tokens: int | Sequence[int] | None = None, stop: Sequence[int] | None = None,
            on_text: Callable[[Any, str], None] | None = None,
            is_active: Callable[[Any], bool] | None = None) -> list[Row]:
        """Prefill `batch` (EmoInputs) in one pass and let its rows join before the next step.

        `keys` name the rows in the callbacks (default 0, 1, ...); `max_new_tokens` is one limit
        or one per row (default: the checkpoint's); `stop` the stop token ids (default: the
        model's). If the prefill raises, the running rows are untouched.
        """
        if not batch:
            return []
        keys = list(range(len(batch))) if keys is None else list(keys)
        limit = max_new_tokens or self.model.config.max_new_tokens
        limits = list(limit) if isinstance(limit, Sequence) else [limit] * len(batch)
        if len(keys) != len(batch) or len(limits) != len(batch):
            raise ValueError(f"{len(batch)} inputs but {len(keys)} keys and {len(limits)} limits")
        stop = frozenset(self.model.stop_token_ids() if stop is None else stop)
        state = self.model.prefill(list(batch))
        rows = [Row(key, max(1, int(n)), stop, on_text, is_active) for key, n in zip(keys, limits)]
        if not self.rows:
            self._logits, self._cache, self._mask, self._positions = state
        else:
            self._merge(state)
        self.rows += rows
        return rows

    @torch.no_grad()
    def step(self) -> list[Row]:
        """One decoding step for every row; returns the rows that finished (they have left)."""
        if not self.rows:
            return []
        do_sample, temperature, top_p, generator = self.sampling
        next_ids = self.model._pick(self._logits, do_sample, temperature, top_p, generator)
        tokenizer = self.model.tokenizer
        keep, finished = [], []
        for index, (row, token) in enumerate(zip(self.rows, next_ids.tolist())):
            if row.is_active and not row.is_active(row.key):
                row._finish("cancelled", tokenizer)
            elif token in row.stop:
                row._finish("stop", tokenizer)
            else:
                row._push(token, tokenizer)
                if len(row.tokens) < row.max_new_tokens:
                    keep.append(index)
                    continue
                row._finish("length", tokenizer)
            finished.append(row)
        if finished:
            self._select(keep)
            next_ids = next_ids[keep]
        if self.rows:
            self._mask = torch.cat([self._mask, self._mask.new_ones(len(self.rows), 1)], dim=1)
            self._positions = self._positions + 1
            self._logits = self.model.decode(next_ids, self._cache, self._mask, self._positions)
        return finished

    def clear(self) -> list[Row]:
        """Drop every row (after a failed step) and return them."""
        rows, self.rows = self.rows, []
        self._logits = self._cache = self._mask = self._positions = None
        return rows

    # ------------------------------------------------------------------ the KV cache
    def _merge(self, state: Prefill) -> None:
        """Joiners' cache after the running rows', both left-padded to the longer of the two."""
        length = max(self.length, state.mask.shape[1])
        pad_old, pad_new = length - self.length, length - state.mask.shape[1]
        layers, joining = _layers(self._cache), _layers(state.cache)
        if layers is None or joining is None:
            raise NotImplementedError(f"rows can join a running batch only with a DynamicCache of "
                                      f"full-attention layers, not {type(self._cache).__name__}")
        for old, new in zip(layers, joining, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, pad_old), _pad_left(new.keys, pad_new)])
            old.values = torch.cat([_pad_left(old.values, pad_old), _pad_left(new.values, pad_new)])
        self._mask = torch.cat([F.pad(self._mask, (pad_old, 0)), F.pad(state.mask, (pad_new, 0))])
        self._positions = torch.cat([self._positions, state.positions])
        self._logits = torch.cat([self._logits, state.logits])

    def _select(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._logits = self._cache = self._mask = self._positions = None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask, self._positions, self._logits = self._mask[index], self._positions[index], self._logits[index]
        # Columns that were padding for every row left: cut them, or they cost every later step.
        unused = int(self._mask.any(0).long().argmax())
        layers = _layers(self._cache) if unused else None
        if layers is not None:
            for layer in layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            self._mask = self._mask[:, unused:]


def _layers(cache) -> list | None:
    """The cache's per-layer key/value holders, or None when they cannot be re-padded: a
    sliding-window or linear-attention layer keeps state that is not one column per token (such a
    batch still decodes, and drops finished rows; it only cannot take joiners or be trimmed)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return None
    return layers


def _pad_left(states: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, n + T, D) with zeros in front (masked out, never attended)."""
    return F.pad(states, (0, 0, n, 0)) if n else states
