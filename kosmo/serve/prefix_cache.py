"""The prefix cache: keys and values of prompt blocks that earlier requests computed, for requests that
begin the same way (a shared system prompt, the earlier turns of a chat) to reuse instead of recompute.

A prompt is cut into blocks of `block` tokens. A block is known by a chained hash, of the hash of the
blocks before it and its own tokens, so it stands for its whole prefix, as in vLLM. A hash only finds a
block: its own tokens and the block before it (the very block, not its hash) are compared before it is
used, so a collision costs a miss, never another prompt's keys. The blocks live in a pool preallocated for `tokens` positions,
and the least recently used one makes room for a new one.

The cache never changes a number, because the engine prefills a cacheable prompt block by block
(`Engine._prefill_blocks`): block j is computed by the same call on the same inputs whether the blocks
before it were computed just now or copied from here, with the bits that call gave them.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from kosmo.model.cache import KVCache


@dataclass(eq=False)
class Block:
    key: int               # hash((parent's key, tokens))
    parent: Block | None   # the block before it; None for a prompt's first
    tokens: tuple[int, ...]
    index: int             # its place in the pool


def chain_key(parent: Block | None, tokens: tuple[int, ...]) -> int:
    return hash((None if parent is None else parent.key, tokens))


class PrefixCache:
    def __init__(self, cache: KVCache, tokens: int, block: int = 64):
        """Room for `tokens` positions (whole blocks of `block`) of the keys and values that `cache`
        holds, in its dtype and on its device."""
        n_layers, _, n_kv_heads, _, head_dim = cache.k.shape
        self.block = block
        n = tokens // block
        self.k = cache.k.new_zeros(n_layers, n, n_kv_heads, block, head_dim)
        self.v = torch.zeros_like(self.k)
        # a model with smeared keys continues from the last key before it was blended (`Attention.smear_with_cache`)
        self.last_k = None if cache.last_k is None else cache.last_k.new_zeros(n_layers, n, n_kv_heads, 1, head_dim)
        self.blocks: collections.OrderedDict[int, Block] = collections.OrderedDict()  # least recently used first
        self.free = list(range(n))
        self.hit_tokens = 0  # prompt positions copied from the cache rather than computed, over its life

    @property
    def capacity(self) -> int:
        """Blocks the pool holds."""
        return self.k.shape[1]

    def match(self, ids: list[int]) -> list[Block]:
        """The cached blocks that begin `ids`, first to last. The prompt's last token is always left out,
        so the forward after them has a position to give logits at."""
        chain: list[Block] = []
        for start in range(0, len(ids) - self.block, self.block):
            parent, tokens = (chain[-1] if chain else None), tuple(ids[start:start + self.block])
            found = self.blocks.get(chain_key(parent, tokens))
            # the same parent object, not just its hash: an evicted parent's children are never matched again
            if found is None or found.parent is not parent or found.tokens != tokens:
                break
            chain.append(found)
        return chain

    def load(self, row: KVCache, chain: list[Block]):
        """Empties the one-row cache `row` and fills it with the blocks of `chain`, which become the most
        recently used."""
        row.reset()
        if not chain:
            return
        self.touch(chain)
        index = torch.tensor([b.index for b in chain], device=self.k.device)
        n = len(chain) * self.block
        for pool, dest in ((self.k, row.k), (self.v, row.v)):
            # (layers, blocks, heads, block, d) -> (layers, heads, blocks * block, d)
            dest[:, 0, :, :n] = pool[:, index].transpose(1, 2).flatten(2, 3)
        if self.last_k is not None:
            row.last_k[:, 0] = self.last_k[:, chain[-1].index]
        row.lengths.fill_(n)
        self.hit_tokens += n

    def add(self, row: KVCache, parent: Block | None, tokens: tuple[int, ...]) -> Block:
        """Keeps the block of `tokens` after `parent` that the one-row cache `row` has just computed as its
        last `block` positions, evicting the least recently used block if the pool is full. The engine keeps
        no more of a prompt than the pool holds, so adding a chain's end never evicts its start."""
        key = chain_key(parent, tokens)
        found = self.blocks.get(key)
        if found is not None and found.parent is parent and found.tokens == tokens:
            return found
        if found is not None:  # a hash collision: the newer block takes the key
            self.free.append(self.blocks.pop(key).index)
        if not self.free:
            # the chain so far is the most recently used, and shorter than the pool: this is not part of it
            self.free.append(self.blocks.popitem(last=False)[1].index)
        block = Block(key, parent, tokens, self.free.pop())
        end = int(row.lengths[0])
        self.k[:, block.index] = row.k[:, 0, :, end - self.block:end]
        self.v[:, block.index] = row.v[:, 0, :, end - self.block:end]
        if self.last_k is not None:
            self.last_k[:, block.index] = row.last_k[:, 0]
        self.blocks[key] = block
        return block

    def touch(self, chain: list[Block]):
        """Marks a prompt's blocks as just used, its first block last: a chain is then evicted from its end,
        and a block seldom outlives the one before it, without which it is never matched."""
        for block in reversed(chain):
            if self.blocks.get(block.key) is block:
                self.blocks.move_to_end(block.key)
