"""WebDataset shards (:mod:`ddpmlab.data.shards`) streamed as training data, batched by training step, so that
a resumed run continues with exactly the samples the straight run would have used.

The order, a function of (train.seed, the number of processes R, of loader workers W = max(data.num_workers, 1)
and the batch size) alone:

* epoch e of the shards is a permutation of them seeded by (seed, e); process r takes shards r::R of it, and
  its stream w (one per loader worker) takes w::W of those;
* a stream is its shards' usable samples in order, shuffled within blocks of B consecutive samples (a
  permutation seeded by (seed, e, r, w, block); B = :data:`SHUFFLE_BYTES` of decoded images, 16 to 1000), epoch
  after epoch: every epoch of a stream shows each of its samples once, and the streams of an epoch share the
  shards out, so each sample is shown exactly once per epoch;
* training step k of process r is batch k // W of stream k mod W: its next train.batch_size / R samples (a
  stream's epochs follow each other without a break; streams reach their epoch ends at different steps).

Resumed at step k, stream w starts at sample ceil((k - w) / W) * b: whole epochs and shards are skipped from
their sample counts (``shards.json``, else each shard counted once by reading it, no pixel decoded), the
samples before it in its shuffle block without decoding.  Resumed with another R, W or batch size, a run
continues in another order.  Only one shuffle block per stream is decoded in memory at a time.

An image whose header reads but whose pixels do not decode (a cut-off JPEG) cannot be told from a good one
without decoding, so it keeps its place in the count and is replaced by the next decodable sample of its
shuffle block (a block without one is an error); every other bad sample is skipped (see
:mod:`ddpmlab.data.shards`).  A streamed text run's captions come with its batches, drawn per training step
from (seed, step, the sample's key) where a sample has several: a batch is ``(x, y, texts)``.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from ddpmlab.data.images import CHANNEL_MODES, from_uint8, load_image
from ddpmlab.data.shards import (
    Rules,
    ShardReport,
    count_samples,
    index_count,
    read_index,
    read_samples,
    shard_list,
    shard_name,
    warn_once,
)
from ddpmlab.errors import DataError

SHUFFLE_BYTES = 256 * 2**20  # decoded pixels a stream's shuffle block holds at most
SHUFFLE_BLOCK = (16, 1000)  # the fewest and the most samples in a shuffle block


def derived_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` alone (BLAKE2b of their text): the same in every process and worker."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def pick_caption(seed: int, step: int, key: str, captions: Sequence[str]) -> str:
    """The caption a sample of several shows at training step ``step``: uniform, from (seed, step, key)."""
    return captions[0] if len(captions) == 1 else captions[derived_seed(seed, step, key) % len(captions)]


@dataclass
class Entry:
    """One sample of a stream: ``pixels`` uint8 (H, W, C), None where the image does not decode."""

    key: str
    pixels: Optional[np.ndarray]
    captions: tuple
    label: int


class ShardStream(torch.utils.data.IterableDataset):
    """Training data streamed from WebDataset shards (``data.dataset: webdataset``); never indexed, never held
    whole.  Iterating it gives ``(x, y)`` of epoch 0 in shard order (a look at the data); training takes
    :meth:`step_batches`.  ``captions``: a text run (samples need a ``txt``); ``num_classes``: labels needed
    in 0..num_classes-1 (0: none; the class names come from ``shards.json``)."""

    streamed = True
    is_image = True

    def __init__(self, path: str, image_size: Sequence[int] = (32, 32), channels: int = 3, captions: bool = False,
                 num_classes: int = 0, seed: int = 0, block: Optional[int] = None):
        if channels not in CHANNEL_MODES:
            raise DataError(f"data.channels: must be 1, 3 or 4, got {channels}")
        self.path, self.seed = str(path), int(seed)
        self.shards = shard_list(self.path)
        self.index = read_index(self.path)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.channels = int(channels)
        self.sample_shape = (self.channels, *self.image_size)
        self.class_names = [str(n) for n in self.index.get("class_names", [])] if self.index.get("labels") else []
        self.num_classes = len(self.class_names) or int(num_classes or 0)
        self.rules = Rules(bool(captions), int(num_classes or 0))
        per_image = self.image_size[0] * self.image_size[1] * self.channels
        self.block = int(block or min(max(SHUFFLE_BYTES // per_image, SHUFFLE_BLOCK[0]), SHUFFLE_BLOCK[1]))

    def __len__(self) -> int:
        """Usable samples in all shards (``shards.json``, else every shard read once: slow for remote shards)."""
        return sum(self.count(s) for s in self.shards)

    def __repr__(self) -> str:
        return (f"ShardStream('{self.path}', {len(self.shards)} shards, shape {self.sample_shape}, "
                f"captions {self.rules.captions}, classes {self.num_classes})")

    def check(self) -> None:
        """Read the first shard up to its first usable sample: a one-line DataError with what it skipped when it
        has none (no labels for a conditional run, no captions for a text run, not a tar)."""
        report = ShardReport(shard_name(self.shards[0]), self.shards[0])
        if next(read_samples(self.shards[0], self.rules, report), None) is None:
            raise DataError(f"{report.line() or f'data.path: shard {report.shard!r} holds no sample'}; the run "
                            f"needs an image{' and a .txt caption' if self.rules.captions else ''}"
                            f"{' and a .cls label' if self.rules.num_classes else ''} per sample")

    def all_captions(self) -> list:
        """Every usable sample's captions (a tuple each), shard by shard in data.path's order: one pass over the
        shards that decodes no pixel.  What a text run's own tokenizer, a frozen encoder's caption cache and the
        drawings' prompts are made from; data too large to pass over once train a frozen encoder with
        text.cache=false instead, which encodes each step's captions as they come."""
        out = []
        for url in self.shards:
            report = ShardReport(shard_name(url), url)
            out += [sample.captions for sample in read_samples(url, self.rules, report)]
            warn_once(report)
        return out

    def count(self, shard: str) -> int:
        return count_samples(shard, self.rules, self.index)

    def epoch_shards(self, epoch: int, rank: int = 0, world: int = 1, stream: int = 0, streams: int = 1) -> list:
        """The shards of ``stream`` (of ``streams``) of process ``rank`` (of ``world``) in ``epoch``, in order."""
        g = torch.Generator().manual_seed(derived_seed("shards", self.seed, epoch))
        order = torch.randperm(len(self.shards), generator=g).tolist()
        return [self.shards[i] for i in order[rank::world][stream::streams]]

    def entries(self, rank: int = 0, world: int = 1, stream: int = 0, streams: int = 1, skip: int = 0
                ) -> Iterator[Entry]:
        """Stream ``stream`` of process ``rank``, epoch after epoch, from its sample ``skip`` on (endless)."""
        epoch = 0
        while True:
            shards = self.epoch_shards(epoch, rank, world, stream, streams)
            if skip:  # whole epochs from the counts
                n = sum(self.count(s) for s in shards)
                if n == 0:
                    raise self._empty(shards, epoch, rank, stream)
                if skip >= n:
                    skip, epoch = skip - n, epoch + 1
                    continue
            shown = 0
            for entry in self._epoch(epoch, shards, skip, (rank, stream)):
                shown += 1
                yield entry
            if not shown and not skip:
                raise self._empty(shards, epoch, rank, stream)
            skip, epoch = 0, epoch + 1

    def _epoch(self, epoch: int, shards: list, skip: int, ids: tuple) -> Iterator[Entry]:
        """One epoch of a stream from its sample ``skip``, in shuffle blocks."""
        first = skip // self.block * self.block  # the first sample of the block the stream resumes in
        drop, pos, i = skip - first, 0, 0
        if first:
            while pos + self.count(shards[i]) <= first:  # whole shards before the block
                pos, i = pos + self.count(shards[i]), i + 1
        j, block = first // self.block, []
        for entry in self._read(shards[i:], first - pos):
            block.append(entry)
            if len(block) == self.block:
                yield from self._shuffled(block, epoch, ids, j)[drop:]
                drop, block, j = 0, [], j + 1
        if block:
            yield from self._shuffled(block, epoch, ids, j)[drop:]

    def _read(self, shards: list, drop: int) -> Iterator[Entry]:
        """The samples of ``shards`` in order, the first ``drop`` not decoded and left out."""
        for url in shards:
            report = ShardReport(shard_name(url), url)
            for sample in read_samples(url, self.rules, report):
                if drop:
                    drop -= 1
                    continue
                yield self._decode(sample, report)
            known = index_count(url, self.rules, self.index)
            if known is not None and known != report.samples and not report.broke:
                warnings.warn(f"data.path: shards.json says '{report.shard}' holds {known} samples but reading it "
                              f"found {report.samples}: a resumed run may show some samples twice or miss some; "
                              "delete shards.json to count by reading", stacklevel=2)
            warn_once(report)

    def _decode(self, sample, report: ShardReport) -> Entry:
        try:
            pixels = load_image(io.BytesIO(sample.image), self.image_size, self.channels)
        except Exception as e:  # noqa: BLE001 - any decoder failure: replaced in its block
            report.undecodable += 1
            report.example.setdefault("undecodable", f"{sample.key} ({type(e).__name__})")
            pixels = None
        return Entry(sample.key, pixels, sample.captions, sample.label)

    def _shuffled(self, block: list, epoch: int, ids: tuple, j: int) -> list:
        """Block ``j`` of a stream's epoch in its seeded order; an undecodable image replaced by the next good one."""
        g = torch.Generator().manual_seed(derived_seed("block", self.seed, epoch, *ids, j))
        out = [block[i] for i in torch.randperm(len(block), generator=g).tolist()]
        good = [i for i, e in enumerate(out) if e.pixels is not None]
        if len(good) == len(out):
            return out
        if not good:
            raise DataError(f"data.path: none of the {len(out)} images from '{out[0].key}' to '{out[-1].key}' "
                            "decodes; repair or remove their shards")
        return [e if e.pixels is not None else out[good[bisect.bisect(good, i) % len(good)]]
                for i, e in enumerate(out)]

    def _empty(self, shards: list, epoch: int, rank: int, stream: int) -> DataError:
        names = ", ".join(f"'{shard_name(s)}'" for s in shards[:3]) + (", ..." if len(shards) > 3 else "")
        return DataError(f"data.path: the shards of process {rank}, loader stream {stream} in epoch {epoch} ({names}) "
                         "hold no usable sample (see the warnings above); repair them or remove them from data.path")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rank, world = (info.id, info.num_workers) if info is not None else (0, 1)
        for url in self.shards[rank::world]:
            report = ShardReport(shard_name(url), url)
            for sample in read_samples(url, self.rules, report):
                entry = self._decode(sample, report)
                if entry.pixels is not None:
                    yield from_uint8(entry.pixels), torch.tensor(entry.label)
            warn_once(report)

    def step_batches(self, start: int, stop: int, per_rank: int, rank: int = 0, world: int = 1,
                     workers: int = 1) -> "StepBatches":
        """Process ``rank``'s batches of training steps start..stop-1 (what a DataLoader of ``workers``
        workers, batch_size None, iterates)."""
        return StepBatches(self, start, stop, per_rank, rank, world, workers)


class StepBatches(torch.utils.data.IterableDataset):
    """A process's batches of training steps ``start..stop-1`` from a :class:`ShardStream`: ``(x, y)`` with x
    float32 (b, C, H, W) in [-1, 1] and y int64 (b,), and a text run's ``texts`` (b captions) third.

    Loader worker p serves stream (p + start) mod W, so a DataLoader (which takes one batch from each worker
    in turn, starting with worker 0) yields the steps in order."""

    def __init__(self, stream: ShardStream, start: int, stop: int, per_rank: int, rank: int = 0, world: int = 1,
                 workers: int = 1):
        workers = max(int(workers), 1)
        if len(stream.shards) < world * workers:
            raise DataError(f"data.path: {len(stream.shards)} shards cannot feed {world} processes x {workers} loader "
                            f"workers (each needs a shard of its own); write at least {world * workers} shards "
                            "(`ddpm data shards SRC OUT --per-shard N`) or lower data.num_workers")
        self.stream, self.start, self.stop, self.per = stream, int(start), int(stop), int(per_rank)
        self.rank, self.world, self.workers = int(rank), int(world), workers

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def stream_batches(self, w: int) -> Iterator[tuple]:
        """(step, batch) of the steps k in start..stop-1 with k mod W == w, from stream w."""
        first = self.start + (w - self.start) % self.workers
        skip = (first - w) // self.workers * self.per  # the samples of the batches before step `first`
        entries = self.stream.entries(self.rank, self.world, w, self.workers, skip)
        for step in range(first, self.stop, self.workers):
            yield step, self.collate([next(entries) for _ in range(self.per)], step)

    def collate(self, entries: list, step: int) -> tuple:
        x = from_uint8(np.stack([e.pixels for e in entries]))
        y = torch.tensor([e.label for e in entries], dtype=torch.int64)
        if not self.stream.rules.captions:
            return x, y
        return x, y, [pick_caption(self.stream.seed, step, e.key, e.captions) for e in entries]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        p, n = (info.id, info.num_workers) if info is not None else (0, 1)
        if n != self.workers:
            raise DataError(f"the stream was planned for {self.workers} loader workers but runs in {n}; build the "
                            "DataLoader with num_workers=data.num_workers")
        for _, batch in self.stream_batches((p + self.start) % self.workers):
            yield batch
