"""Corpora larger than memory: a folder of parquet shards, streamed with Hugging Face `datasets`.

`TextStream` packs text for the lm stage; `ExampleStream` reads records with pictures (LLaVA rows, captions,
VQA, chats) for the multimodal stages, one example a row, pictures decoded as batches need them. Both read
through a `ShardReader`, and the text stream works as follows.

    kosmo shard --data a.jsonl b.parquet --out shards/ --rows-per-shard 100000
    kosmo train lm --data shards/ --out runs/lm train.max_steps=10000

Each rank reads its own shards (`split_dataset_by_node`: shard i of an epoch goes to rank i mod world when
the shard count is a multiple of the world size, else every rank reads all shards and keeps its own rows),
the shard order is shuffled per epoch by the seed, and documents are packed exactly as `PackedText` packs
them: <s> doc </s> <s> doc </s> … cut into rows of seq_len + 1 tokens that overlap by one. Memory holds
one parquet record batch and the tokens of at most `batch_docs` documents. The position (the epoch, the
`datasets` state of the shard and row, and the tokens read but not yet in a row) is the stream's
`state_dict`, saved with every checkpoint, so that a resumed run reads on from the exact token.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from kosmo.data.formats import Source
from kosmo.data.images import ImageCache
from kosmo.errors import KosmoError
from kosmo.tokenizer import BOS, EOS, Tokenizer

READ_AHEAD_DOCS = 256  # documents tokenized at a time: the tokenizer is faster in batches, and memory is bounded


class ShardReader:
    """The rows of a folder of parquet shards, endlessly, epoch after epoch, this rank's share of each epoch;
    its `state_dict` is the position: the epoch and `datasets`' state of the shard and the row in it."""

    def __init__(self, source: Source, columns: list[str] | None, rank: int = 0, world: int = 1, seed: int = 0):
        self.files, self.columns = [str(f) for f in source.files], columns
        self.rank, self.world, self.seed = rank, world, seed
        if len(self.files) % world and rank == 0:
            print(f"stream: {len(self.files)} shards do not divide among {world} ranks, so every rank reads every "
                  "shard and keeps its own rows; a multiple of the world size reads each shard once",
                  file=sys.stderr)
        self._open(0)

    def shard_order(self, epoch: int) -> list[str]:
        """Every shard, in the order an epoch reads them (before they are dealt out to ranks)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return [self.files[i] for i in torch.randperm(len(self.files), generator=gen).tolist()]

    def _open(self, epoch: int, state: dict | None = None):
        from datasets import IterableDataset
        from datasets.distributed import split_dataset_by_node
        ds = IterableDataset.from_parquet(self.shard_order(epoch), columns=self.columns).decode(False)
        self.epoch, self.docs = epoch, split_dataset_by_node(ds, rank=self.rank, world_size=self.world)
        if state is not None:
            self.docs.load_state_dict(state)
        self._rows = iter(self.docs)

    def next_row(self) -> dict:
        """The next row, opening the next epoch when this one ends."""
        try:
            return next(self._rows)
        except StopIteration:
            self._open(self.epoch + 1)
        try:
            return next(self._rows)
        except StopIteration:
            raise KosmoError(f"rank {self.rank} of {self.world} has no rows in {len(self.files)} shard(s)") from None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "docs": self.docs.state_dict()}

    def load_state_dict(self, state: dict):
        self._open(state["epoch"], state["docs"])


class TextStream:
    """Packed rows from parquet shards, endlessly; `next_batch(n)` gives the trainer's batch."""

    def __init__(self, source: Source, tokenizer: Tokenizer, seq_len: int, rank: int = 0, world: int = 1,
                 seed: int = 0, batch_docs: int = READ_AHEAD_DOCS):
        import pyarrow.parquet as pq
        self.column = source.columns.get("text", "text")
        for f in source.files:
            names = pq.read_schema(f).names
            if self.column not in names:
                raise KosmoError(f"{f}: no column {self.column!r} to stream text from (columns: {', '.join(names)}; "
                                 "map one with ?text=COLUMN)")
        self.tokenizer, self.seq_len, self.batch_docs = tokenizer, seq_len, batch_docs
        self.tokens: list[int] = []  # read, not yet all in rows: the last row's final token starts the next
        self.reader = ShardReader(source, [self.column], rank, world, seed)

    def _read(self):
        texts = [self.reader.next_row()[self.column] for _ in range(self.batch_docs)]
        for ids in self.tokenizer.encode_batch([t for t in texts if t is not None]):
            self.tokens += [BOS, *ids, EOS]

    def next_rows(self, n: int) -> torch.Tensor:
        """The next n rows of seq_len + 1 tokens."""
        rows = []
        for _ in range(n):
            while len(self.tokens) < self.seq_len + 1:
                self._read()
            rows.append(self.tokens[: self.seq_len + 1])
            del self.tokens[: self.seq_len]
        return torch.tensor(rows, dtype=torch.long)

    def next_batch(self, n: int) -> dict:
        rows = self.next_rows(n)
        return {"input": rows[:, :-1], "labels": rows[:, 1:], "n_targets": rows[:, 1:].numel()}

    def state_dict(self) -> dict:
        """The position: JSON-able fields and one tensor (the tokens read ahead)."""
        return {**self.reader.state_dict(), "tokens": torch.tensor(self.tokens, dtype=torch.int32)}

    def load_state_dict(self, state: dict):
        self.reader.load_state_dict(state)
        self.tokens = state["tokens"].tolist()


class ExampleStream:
    """Multimodal examples from parquet shards whose rows are records (captions, VQA, chats, LLaVA items, with
    pictures inline or as paths), endlessly. Pictures are decoded as batches need them, through `images` (an
    LRU `ImageCache`); a row whose picture does not load is left out. `make(record, where)` gives a row's
    Example, or None for one with nothing left to learn."""

    def __init__(self, source: Source, make, images: ImageCache, pack_len: int, rank: int = 0, world: int = 1,
                 seed: int = 0):
        self.source, self.make, self.images, self.pack_len = source, make, images, pack_len
        self.reader = ShardReader(source, None, rank, world, seed)

    def _pixels(self, refs: list) -> torch.Tensor:
        if not refs:
            return torch.empty(0, 3, self.images.size, self.images.size)
        return torch.stack([self.images.get(r) for r in refs])

    def next_batch(self, n: int) -> dict:
        from kosmo.data.formats import convert, table_record
        from kosmo.data.multimodal import collate_examples
        examples = []
        while len(examples) < n:
            where = f"{self.source.path} (a row of epoch {self.reader.epoch}, rank {self.reader.rank})"
            record = convert(table_record(self.reader.next_row(), self.source.columns, where), where, self.source)
            example = self.make(record, where)
            if example is None:
                continue
            try:
                self._pixels(example.images)  # decoded now, and again from the cache when the batch is made
            except KosmoError:
                continue  # listed in images.skipped
            examples.append(example)
        return collate_examples(examples, self.pack_len, self._pixels)

    def state_dict(self) -> dict:
        return self.reader.state_dict()

    def load_state_dict(self, state: dict):
        self.reader.load_state_dict(state)


def write_shards(texts: Iterable[str], out: str | Path, rows_per_shard: int, row_group: int = 1024) -> list[Path]:
    """Documents into parquet shards of `rows_per_shard` rows (a "text" column), in order; each shard is
    written under a temporary name and renamed when complete, so a folder never holds a torn shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if rows_per_shard < 1:
        raise KosmoError(f"--rows-per-shard must be at least 1, got {rows_per_shard}")
    out = Path(out)
    if out.is_dir() and any(out.glob("*.parquet")):
        raise KosmoError(f"{out}: already holds parquet shards; write to a new folder")
    out.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("text", pa.string())])
    shards: list[Path] = []
    writer, rows, pending = None, 0, []

    def flush():
        if pending:
            writer.write_table(pa.table({"text": pending}, schema=schema), row_group_size=row_group)
            pending.clear()

    def close():
        flush()
        writer.close()
        shards[-1].with_suffix(".tmp").rename(shards[-1])

    for text in texts:
        if writer is None:
            shards.append(out / f"shard-{len(shards):05d}.parquet")
            writer = pq.ParquetWriter(shards[-1].with_suffix(".tmp"), schema)
        pending.append(text)
        rows += 1
        if len(pending) == row_group:
            flush()
        if rows == rows_per_shard:
            close()
            writer, rows = None, 0
    if writer is not None:
        close()
    if not shards:
        raise KosmoError("the data holds no text to shard")
    return shards
