"""A task's training data: read and checked, described in one line, encoded to latents, batched by step.

The data order depends only on the training step (:class:`StepBatchSampler`), never on how often a run
was stopped and resumed or on how many processes share it.  Streamed shards (``data.dataset: webdataset``,
:mod:`ddpmlab.data.stream`) are batched by step too, in an order that also depends on the number of processes
and loader workers; a latent run encodes their batches as they come (:class:`LatentStream`)."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from ddpmlab.config import Config
from ddpmlab.data import InMemoryDataset, build_dataset
from ddpmlab.data.latents import cached_latents, encode_batches, latent_cache_key
from ddpmlab.errors import ConfigError
from ddpmlab.evaluate.reference import dataset_fingerprint, default_cache_dir
from ddpmlab.models.conditioned import check_low_res
from ddpmlab.progress import progress_bar
from ddpmlab.runs import load_autoencoder
from ddpmlab.training.distributed import check_batch_split


class StepBatchSampler(torch.utils.data.Sampler):
    """Index batches for steps ``start..steps-1``: epoch e is a permutation seeded by (seed, e).

    Each process takes its ``rank``-th slice of the global batch, so data order depends
    only on the step, never on how often the run was stopped and resumed.
    """

    def __init__(self, n: int, global_batch: int, start: int, steps: int, seed: int, rank: int = 0,
                 world: int = 1):
        if global_batch % world:
            raise ConfigError(f"train.batch_size ({global_batch}) must be divisible by the number of processes "
                              f"({world})")
        self.n, self.gb, self.start, self.steps = n, global_batch, start, steps
        self.seed, self.rank, self.world = seed, rank, world

    def __len__(self) -> int:
        return max(self.steps - self.start, 0)

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        per = self.gb // self.world
        per_epoch = max(self.n // self.gb, 1)
        epoch_perm = (None, None)  # one permutation per epoch, not per training step
        for step in range(self.start, self.steps):
            epoch, k = divmod(step, per_epoch)
            if epoch_perm[0] != epoch:
                epoch_perm = (epoch, self._perm(epoch))
            perm = epoch_perm[1]
            if self.n < self.gb:  # tiny datasets: draw with repetition
                perm = perm.repeat((self.gb + self.n - 1) // self.n)
            batch = perm[k * self.gb:(k + 1) * self.gb]
            yield batch[self.rank * per:(self.rank + 1) * per].tolist()


def load_data(cfg: Config) -> torch.utils.data.Dataset:
    """The training data of ``cfg.data``, checked against model.num_classes and data.low_res."""
    dataset = build_dataset(cfg)
    if getattr(dataset, "streamed", False):
        check_streamed(cfg)
        dataset.check()  # the first shard has a usable sample
    if dataset.is_image:
        check_low_res(cfg, dataset.sample_shape)  # super-resolution: the low-res size fits the images
    n = cfg.model.num_classes
    if n and not dataset.num_classes:
        raise ConfigError(f"model.num_classes is {n} but the data ({cfg.data.dataset}"
                          f"{' ' + str(cfg.data.path) if cfg.data.path else ''}) has no labels; put the images "
                          "in one sub-folder per class or set model.num_classes=null")
    if n and n < dataset.num_classes:
        raise ConfigError(f"model.num_classes ({n}) is smaller than the dataset's {dataset.num_classes} classes")
    return dataset


def check_streamed(cfg: Config) -> None:
    """Refuse what needs numbered examples of streamed shards, which have none."""
    what = f"data.dataset=webdataset streams its shards ({cfg.data.path}) and numbers no image"
    if cfg.train.eval_every:
        raise ConfigError(f"train.eval_every={cfg.train.eval_every}: the evaluation's reference images are numbered "
                          f"images of the data, and {what}; set train.eval_every=0")
    if cfg.model.condition != "none":
        raise ConfigError(f"model.condition={cfg.model.condition}: the drawings pick numbered images of the data, and "
                          f"{what}; train on an image folder (data.dataset=folder)")


class LatentStream:
    """Streamed shards seen through an autoencoder: each batch's images encoded as it comes (on the training
    device), z' = (mu(x) - shift) * scale (Rombach et al. 2022); the rest of the batch (labels, texts) as is."""

    streamed = True
    is_image = True

    def __init__(self, stream, codec):
        self.stream, self.codec = stream, codec
        self.sample_shape = codec.latent_shape(stream.sample_shape)
        self.num_classes, self.class_names = stream.num_classes, stream.class_names

    def __len__(self) -> int:
        return len(self.stream)

    def encode(self, batch) -> tuple:
        return (self.codec.encode(batch[0]), *batch[1:])


def latent_dataset(cfg: Config, dataset, accelerator: Accelerator, main: bool, progress: bool) -> tuple:
    """(the latents of ``dataset`` as an InMemoryDataset, what RUN/latents.json records).

    Rombach et al. 2022: z' = (mu(x) - shift) * scale of every image, encoded once and cached in
    <cache dir>/latents/<key>.safetensors, key = hash(data content, autoencoder weights and scaling).
    Streamed shards are encoded batch by batch instead (:class:`LatentStream`).
    """
    codec = load_autoencoder(cfg.model.autoencoder, accelerator.device)
    if getattr(dataset, "streamed", False):
        out = LatentStream(dataset, codec)
        if main:
            print(f"latents: {out.sample_shape} per image from {codec.source}, encoded batch by batch")
        return out, {"autoencoder": str(Path(codec.source).resolve()), "identity": codec.identity,
                     "scale_factor": codec.scale, "shift_factor": codec.shift, "latent_shape": list(out.sample_shape)}
    key = latent_cache_key(dataset_fingerprint(dataset), codec.identity)
    cache_file = default_cache_dir() / "latents" / f"{key}.safetensors"

    def encode_all():
        bar = progress_bar(progress and main, total=len(dataset), desc="encoding latents", unit="img")
        try:
            return encode_batches(codec.encode, dataset, bar=bar)
        finally:
            bar.close()

    with accelerator.main_process_first():  # the main process encodes and writes; the others read its file
        z, y, hit = cached_latents(cache_file, encode_all, count=len(dataset))
    if main:
        print(f"latents: {tuple(z.shape[1:])} per image (std {z.std().item():.3f}) from {codec.source}, "
              f"{'read from' if hit else 'encoded once into'} {cache_file}")
    out = InMemoryDataset(z, y, is_image=True, class_names=getattr(dataset, "class_names", []),
                          num_classes=dataset.num_classes)
    record = {"autoencoder": str(Path(codec.source).resolve()), "identity": codec.identity,
              "scale_factor": codec.scale, "shift_factor": codec.shift, "latent_shape": list(z.shape[1:]),
              "cache_file": str(cache_file)}
    return out, record


def describe_data(cfg: Config, dataset) -> str:
    """The run's first line: what it trains on, and at which size (width x height)."""
    d = cfg.data
    if d.dataset == "audio":
        c, length = d.channels, d.length
        classes = f", {dataset.num_classes} classes" if dataset.num_classes else ""
        mel = f", as log-mel images {'x'.join(map(str, dataset.sample_shape))}" if d.representation == "mel" else ""
        return (f"data: {len(dataset):,} sound clips from {dataset.root}{classes}, {'mono' if c == 1 else 'stereo'}, "
                f"{length} samples at {d.sample_rate} Hz ({length / d.sample_rate:.3g} s){mel}")
    if d.dataset == "webdataset":
        c, h, w = dataset.sample_shape
        what = ", with captions" if dataset.rules.captions else ""
        what += f", {dataset.num_classes} classes" if dataset.num_classes else ""
        return (f"data: {len(dataset.shards):,} WebDataset shards streamed from {d.path}{what}, resized and "
                f"center-cropped to {w}x{h}, {c} channel{'s' if c != 1 else ''}")
    if d.dataset == "toy":
        noise = f", noise {d.toy_noise}" if d.toy_noise else ""
        return f"data: {len(dataset):,} points of the 2-D toy distribution {d.toy}{noise}"
    c, h, w = dataset.sample_shape
    channels = f"{c} channel{'s' if c != 1 else ''}"
    classes = f", {dataset.num_classes} classes" if d.dataset == "folder" and dataset.num_classes else ""
    if d.dataset != "folder":
        return f"data: the bundled {d.dataset} ({len(dataset):,} images of {w}x{h}, {channels}; split {d.split})"
    line = f"data: {len(dataset):,} images from {dataset.root}{classes}, resized and center-cropped to {w}x{h}, " \
           f"{channels}"
    big = dataset.largest_original
    if big is not None and (big[0] > w or big[1] > h):
        line += f" (originals up to {big[0]}x{big[1]}: set data.image_size to train at a higher resolution)"
    return line


def step_loader(dataset, cfg: Config, start: int, stop: int, accelerator) -> torch.utils.data.DataLoader:
    """This process's batches of training steps start..stop-1 (see StepBatchSampler; streamed shards: see
    :mod:`ddpmlab.data.stream`)."""
    t = cfg.train
    check_batch_split(t.batch_size, accelerator.num_processes, t.grad_accum_steps)
    if getattr(dataset, "streamed", False):
        return stream_loader(dataset, cfg, start, stop, accelerator)
    sampler = StepBatchSampler(len(dataset), t.batch_size, start, stop, t.seed, accelerator.process_index,
                               accelerator.num_processes)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                       pin_memory=accelerator.device.type == "cuda")


def _as_is(batch):
    return batch  # a stream's batches come whole from its workers


def stream_loader(dataset, cfg: Config, start: int, stop: int, accelerator):
    """Streamed shards' batches of training steps start..stop-1 for this process: its DataLoader (one stream per
    worker, :class:`~ddpmlab.data.stream.StepBatches`), a latent run's batches encoded as they come."""
    world, workers = accelerator.num_processes, cfg.data.num_workers
    stream = getattr(dataset, "stream", dataset)  # a LatentStream wraps the stream of pixels
    batches = stream.step_batches(start, stop, cfg.train.batch_size // world, accelerator.process_index, world,
                                  max(workers, 1))
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                         pin_memory=accelerator.device.type == "cuda")
    encode = getattr(dataset, "encode", None)
    return loader if encode is None else (encode(batch) for batch in loader)
