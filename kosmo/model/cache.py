"""The KV cache: preallocated keys and values of a batch of sequences, each row with its own length.

A forward over a cache extends every row: token t of row b goes to position `lengths[b] + t`, and
row b's length then grows by `n_new[b]` (all T by default). Rows of one batch may therefore hold
sequences of any lengths without padding inside the cache: prompts of different lengths are
right-padded once, and the padding past each row's length is overwritten by what comes next.

The same object serves `generate_ids` (one batch of prompts) and the serving engine, which owns one
cache of `max_batch` slots and runs each new prompt into a one-row view of it (`rows`).

Once rows hold keys, one attention call covers the rows from the first to the last with a new
token: over the keys of the longest, rounded up to a multiple of 64 (`key_span`), each row masked
to its own. A row's numbers then do not
depend on the other rows: the extra keys are masked out, and a masked key adds an exact zero to
sums that are laid out in multiples of the vector width (tests/test_cache.py checks the bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def key_span(n: int) -> int:
    """The keys an attention call over rows holding up to n keys reads: n rounded up to a multiple of 64."""
    return 64 * -(-n // 64)


class KVCache:
    def __init__(self, cfg, batch: int, max_len: int, dtype=torch.float32, device=None, static: bool = False):
        """Room for `max_len` positions per row of `batch`, for an LM of config `cfg` (LMConfig).

        static: every decode step (a forward of one token a row) attends over all rows and the whole
        room, each row masked to its own keys, so its shapes never change and it reads no tensor's value
        on the host: what `torch.compile` needs to capture a decode step as one graph
        (`kosmo.generate.compiled`). The caller keeps within `max_len`, which such a step cannot
        check without a host sync. Prefills run as in a dynamic cache."""
        self.max_len = max_len
        self.static = static
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, key_span(max_len), cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        # smeared keys need each layer's key of a row's last position, before it was blended and rotated
        self.last_k = torch.zeros(shape[:3] + (1, shape[4]), dtype=dtype, device=device) if cfg.smear_keys else None
        self.step: _Step | None = None  # what the forward under way writes where

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache of rows [start, stop) that shares this one's memory: what a forward writes through it
        lands here."""
        view = object.__new__(type(self))
        for name, value in vars(self).items():
            setattr(view, name, value.narrow(1 if name in ("k", "v", "last_k") else 0, start, stop - start)
                    if isinstance(value, torch.Tensor) else value)
        return view

    def reset(self):
        """Empties every row, for a new sequence."""
        self.lengths.zero_()

    def begin(self, T: int, n_new: torch.Tensor | int | None = None) -> torch.Tensor:
        """Starts a forward of T tokens per row, of which the first n_new ((B,) or one count; T by
        default) are real and the rest padding; returns the (B, T) positions of the tokens."""
        pos = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)
        if self.static and T == 1:
            n_new = torch.full_like(self.lengths, T) if n_new is None else torch.as_tensor(n_new, device=pos.device)
            span = torch.arange(self.k.shape[3], device=pos.device)
            self.step = _Step(pos, n_new.expand(self.batch), slice(None), (span <= pos[:, :, None])[:, None])
            return pos
        if T and int(pos[:, -1].max()) >= self.max_len:
            raise ValueError(f"KV cache is full: {int(pos[:, -1].max()) + 1} positions needed, "
                             f"{self.max_len} allocated")
        n_new = torch.as_tensor(T if n_new is None else n_new, device=pos.device).expand(self.batch)
        self.step = _Step(pos, n_new)
        if bool(self.lengths.any()):
            # the rows from the first to the last with a real token attend (the engine fills its slots
            # from the first), over the longest one's keys, each row masked to its own
            real = (n_new > 0).nonzero().flatten().tolist() or [0, self.batch - 1]
            self.step.rows = slice(real[0], real[-1] + 1)
            span = key_span(int(pos[self.step.rows].max()) + 1)
            self.step.mask = (torch.arange(span, device=pos.device) <= pos[self.step.rows, :, None])[:, None]
        return pos

    def end(self):
        """Ends the forward: each row now holds its new tokens."""
        self.lengths += self.step.n_new
        self.step = None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Writes the forward's keys and values (B, Hkv, T, d) of `layer` at each row's positions."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        # One index_put on the whole cache, the layer indexed by a tensor too. Compiled, it writes the new
        # entries in place; written through the layer's view (`self.k[layer][...] = `), Inductor copies
        # the layer's cache in and out around them, which took about a quarter of a batch-1 decode step.
        at = (torch.full_like(self.step.pos, layer), rows, slice(None), self.step.pos)
        self.k[at] = k.transpose(1, 2).to(self.k.dtype)
        self.v[at] = v.transpose(1, 2).to(self.v.dtype)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Stores the new keys and values of `layer` and attends over each row's own.

        q (B, Hq, T, d); k, v (B, Hkv, T, d), rotated. Returns (B, Hq, T, d); the output of a row with
        no real token (an idle slot) is meaningless.
        """
        B, Hq, T, d = q.shape
        Hkv = k.shape[1]
        step = self.step
        self.write(layer, k, v)
        if step.mask is None:  # every row starts here: causal attention over the new keys alone
            return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=Hq != Hkv)
        r, mask = step.rows, step.mask
        span = mask.shape[-1]
        keys, values = self.k[layer, r, :, :span].to(q.dtype), self.v[layer, r, :, :span].to(q.dtype)
        n = keys.shape[0]
        if T == 1 and Hq != Hkv:
            # decoding: fold each kv group's query heads into the query axis, so the cache is read in
            # place instead of being repeated per query head
            out = F.scaled_dot_product_attention(q[r].view(n, Hkv, Hq // Hkv, d), keys, values,
                                                 attn_mask=mask).view(n, Hq, 1, d)
        else:
            out = F.scaled_dot_product_attention(q[r], keys, values, attn_mask=mask, enable_gqa=Hq != Hkv)
        if self.static or n == B:
            return out
        y = torch.zeros_like(q)
        y[r] = out
        return y


@dataclass
class _Step:
    pos: torch.Tensor                 # (B, T) positions of the forward's tokens
    n_new: torch.Tensor               # (B,) real tokens per row
    rows: slice | None = None         # the rows that attend to cached keys (None: no row holds any yet)
    mask: torch.Tensor | None = None  # (rows, 1, T, key span): which keys each of their queries sees
