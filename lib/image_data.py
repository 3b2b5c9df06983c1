"""8-bit image data sets (MNIST, CIFAR-10) as integer pixels, and their loaders.

The data sets yield ``(k, label)`` with k a uint8 tensor (C, H, W) of the integer pixel values
0..255 exactly as stored on disk (no division by 255). The continuous data the model sees is
the dequantised ``x = (k + u) / 256`` (lib/pixels.py), drawn on the batch where it lives (GPU).

On-disk layouts are torchvision's own, read by torchvision's own classes:
  * MNIST:    <dataroot>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (or the .gz files)
  * CIFAR-10: <dataroot>/cifar10/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
    (the ``cifar10`` subfolder as in sdeflow-light).

The data sets themselves are deterministic: they never flip (or otherwise augment) an image.
Random horizontal flips are augmentation for CIFAR-10 training only (``ImageInfo.hflip``): the
training code applies ``random_hflip`` to training batches with an explicit generator, so the test
set never sees them.

Exact resume: a training batch is a pure function of (seed, iteration). ``train_loader`` draws its
indices from ``EpochShuffleSampler`` (batch b depends on (seed, b) alone, and starts at any
iteration), flips and dequantisation noise come from generators the training code seeds from
(seed, iteration), and no loader draws from torch's global RNG. ``test_loader`` keeps every test
example in order and shards whole batches across ranks so that a gathered evaluation sees each one
exactly once, batched as in a single process.
"""
import gzip
import math
import os
import pickle
import shutil
import signal
import struct
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler, Subset
from torchvision.datasets import CIFAR10, MNIST
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2

from lib.rng import Stream, generator


class DatasetNotFoundError(Exception):
    """The data set is absent, incomplete or unreadable, and could not be downloaded.

    The message is one line: the folder, the files expected there and how to get them.
    """


@dataclass(frozen=True)
class ImageInfo:
    """What the model needs to know about a data set's images."""

    name: str
    channels: int
    height: int
    width: int
    hflip: bool  # whether training batches get random horizontal flips (``random_hflip``)

    @property
    def shape(self):
        """(C, H, W) of one image."""
        return (self.channels, self.height, self.width)

    @property
    def dim(self):
        """D = C * H * W, the number of dimensions in bits/dim."""
        return self.channels * self.height * self.width


INFO = {
    "mnist": ImageInfo("mnist", channels=1, height=28, width=28, hflip=False),
    "cifar": ImageInfo("cifar", channels=3, height=32, width=32, hflip=True),
}


def load_image_datasets(name, dataroot, download=True):
    """Train and test sets of ``name`` in {'mnist', 'cifar'} under ``dataroot``.

    Returns (train_set, test_set, info): the sets yield (uint8 tensor (C, H, W), int label);
    info is an ``ImageInfo``. When the files are absent (or unreadable) and ``download`` is on,
    one download is tried; if the data still cannot be read, ``DatasetNotFoundError`` is raised.
    """
    if name not in INFO:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(sorted(INFO))}")
    open_fn = {"mnist": _open_mnist, "cifar": _open_cifar10}[name]
    train_set, test_set = open_fn(os.fspath(dataroot), download)
    return train_set, test_set, INFO[name]


def pixel_counts(dataset):
    """(256,) int64: how often each 8-bit value occurs over all images of a data set returned by
    ``load_image_datasets`` (read from the arrays torchvision holds, without decoding images one by one)."""
    data = dataset.data
    return torch.bincount(torch.as_tensor(data).reshape(-1).long(), minlength=256)


def pixel_transform():
    """PIL image -> uint8 tensor (C, H, W) of the stored values; deterministic (no augmentation here).

    A new (stateless) object on every call, one per data set.
    """
    return v2.PILToTensor()


def train_loader(train_set, batch_size, seed=0, start_iteration=0, num_workers=0, rank=0, world_size=1,
                 pin_memory=False):
    """Endless training batches: the one at iteration b is a pure function of (seed, b).

    Indices come from ``EpochShuffleSampler`` started at ``start_iteration`` (a resumed run gets
    exactly the batches the uninterrupted one would have). ``batch_size`` is the global batch;
    this rank's loader yields its ``batch_size // world_size`` examples of each. Each epoch is a
    fresh permutation whose incomplete last batch is dropped. No draw from torch's global RNG.
    """
    start_iteration = _non_negative_int(start_iteration, "start_iteration")
    sampler = EpochShuffleSampler(len(train_set), batch_size, seed=seed, start_batch=start_iteration, rank=rank,
                                  world_size=world_size)  # validates batch_size, rank and world_size
    return DataLoader(train_set, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      generator=_private_generator(seed), worker_init_fn=_leave_stop_signals_to_the_parent)


def test_loader(test_set, test_batch_size, num_workers=0, test_subset=None, rank=0, world_size=1, pin_memory=False):
    """This rank's test batches, in order: the examples (the first ``test_subset`` of them, else all) cut
    into consecutive batches of ``test_batch_size`` (the last one may be short), global batch j going to
    rank j % world_size; rank r's i-th batch is global batch r + i * world_size.

    Whole batches are sharded, not examples, so each batch holds the same examples for any number of
    ranks: an evaluation seeded per global batch gives every example the same value whatever
    world_size is, and gathering the batches over ranks covers each example exactly once (no padding,
    no duplicates; a rank may get none when there are fewer batches than ranks).
    """
    test_batch_size = _positive_int(test_batch_size, "test_batch_size")
    rank, world_size = _check_rank(rank, world_size)
    n = len(test_set) if test_subset is None else len(first_examples(test_set, test_subset))
    num_batches = -(-n // test_batch_size)
    batches = [list(range(j * test_batch_size, min(n, (j + 1) * test_batch_size)))
               for j in range(rank, num_batches, world_size)]
    return DataLoader(test_set, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
                      generator=_private_generator(0), worker_init_fn=_leave_stop_signals_to_the_parent)


test_loader.__test__ = False  # not a test: keeps pytest from collecting it where a test module imports it


def _leave_stop_signals_to_the_parent(worker_id):
    """Loader workers ignore SIGTERM and SIGUSR1. A scheduler (SLURM) signals every process of a job, and a
    worker killed by it makes torch fail the training process at once, before that can finish its iteration
    and checkpoint (lib/training.py); the training process shuts its workers down itself."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _private_generator(seed):
    """For the DataLoader's worker base seeds, which would otherwise be drawn from torch's global RNG
    (advancing it on every ``iter(loader)``); the data sets draw nothing, so its value is immaterial."""
    return torch.Generator().manual_seed(int(seed))


class EpochShuffleSampler(Sampler):
    """Endless training batches of indices, each epoch a fresh permutation from (seed, epoch).

    The batch at position b (0-based, counted across epochs) depends on (seed, b) alone, so a run
    resumed at iteration b continues with exactly the batches it would have seen. Each global batch
    of ``batch_size`` indices is split across ``world_size`` ranks (rank r takes every
    world_size-th index from r), like DistributedSampler with per-epoch reshuffling; an
    epoch's last incomplete global batch is dropped.
    """

    def __init__(self, num_examples, batch_size, seed=0, start_batch=0, rank=0, world_size=1):
        self.n = _positive_int(num_examples, "num_examples")
        self.batch_size = _positive_int(batch_size, "batch_size")
        if self.n < self.batch_size:
            raise ValueError(f"batch_size={batch_size} exceeds the {self.n} training examples")
        rank, world_size = _check_rank(rank, world_size)
        start_batch = _non_negative_int(start_batch, "start_batch")
        if self.batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be divisible by the {world_size} processes")
        self.seed, self.start_batch, self.rank, self.world_size = int(seed), int(start_batch), rank, world_size
        self.batches_per_epoch = self.n // self.batch_size

    def __iter__(self):
        b = self.start_batch
        epoch, perm = None, None
        while True:
            e, j = divmod(b, self.batches_per_epoch)
            if e != epoch:
                epoch = e
                perm = torch.randperm(self.n, generator=generator(self.seed, Stream.EPOCH, e))
            batch = perm[j * self.batch_size:(j + 1) * self.batch_size]
            yield batch[self.rank::self.world_size].tolist()
            b += 1


def random_hflip(x, generator=None):
    """Flip each image of x (B, C, H, W) left-right with probability 1/2, drawing from ``generator``.

    Done on the batch (not in the data set's transform) so the randomness is explicit and a resumed
    run flips exactly as the uninterrupted one would.
    """
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def first_examples(dataset, n):
    """The first ``n`` examples of ``dataset``, in order."""
    n = _positive_int(n, "test_subset")
    if n > len(dataset):
        raise ValueError(f"test_subset={n} exceeds the {len(dataset)} test examples")
    return Subset(dataset, range(n))


# --- opening the data sets ---------------------------------------------------------------

# What a missing, truncated or corrupted file makes the readers raise: OSError (absent, unreadable, bad gzip),
# EOFError (truncated gzip or pickle), RuntimeError (torchvision: not found, checksum; torch: a buffer of the
# wrong size), ValueError (our checks below, torch.frombuffer), pickle.UnpicklingError. torchvision's MNIST
# parser would also raise AssertionError, KeyError or TypeError on a damaged IDX header; _check_idx_files
# refuses such headers first (as ValueError), so those types, which a bug raises too, are never caught.
_UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError)

_MNIST_FILES = [os.path.splitext(filename)[0] for filename, _ in MNIST.resources]  # the raw IDX names
_CIFAR10_FILES = [f for f, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]


def _cifar10_checksums():
    """(file, md5) as torchvision's CIFAR10 checks them (read at call time: tests may substitute them)."""
    files = [tuple(x) for x in CIFAR10.train_list + CIFAR10.test_list]
    return files + [(CIFAR10.meta["filename"], CIFAR10.meta["md5"])]


def _open_mnist(dataroot, download):
    folder = os.path.join(dataroot, "MNIST", "raw")

    def build():
        _gunzip_absent(folder, _MNIST_FILES)  # torchvision reads only the uncompressed files
        _check_idx_files(folder)
        sets = tuple(MNIST(dataroot, train=train, transform=pixel_transform()) for train in (True, False))
        for s in sets:
            _check_images(s.data, s.targets, INFO["mnist"], channels_last=False)
        return sets

    def fetch():
        if not all(_exists(folder, f) for f in _MNIST_FILES):  # torchvision downloads only what is absent
            MNIST(dataroot, train=True, download=True)

    def message(load_error, download_error):
        present = [f for f in _MNIST_FILES if _exists(folder, f) or _exists(folder, f + ".gz")]
        expected = ", ".join(_MNIST_FILES) + " (or each with .gz)"
        how = (f"download {', '.join(f + '.gz' for f in _MNIST_FILES)} from {MNIST.mirrors[0]} into that folder, "
               "or run with network access")
        return _message("MNIST", folder, expected, how, _MNIST_FILES, present, load_error, download_error)

    return _open(build, fetch if download else None, message)


def _open_cifar10(dataroot, download):
    root = os.path.join(dataroot, "cifar10")
    folder = os.path.join(root, CIFAR10.base_folder)

    def build():
        sets = tuple(CIFAR10(root, train=train, transform=pixel_transform()) for train in (True, False))
        for s in sets:
            _check_images(s.data, s.targets, INFO["cifar"], channels_last=True)
        return sets

    def fetch():
        CIFAR10(root, train=True, download=True)

    def message(load_error, download_error):
        present = [f for f in _CIFAR10_FILES if _exists(folder, f)]
        bad = [f for f, md5 in _cifar10_checksums()
               if _exists(folder, f) and not check_integrity(os.path.join(folder, f), md5)]
        if bad:  # torchvision's own error does not say which file
            load_error = f"md5 checksum mismatch: {', '.join(bad)}"
        expected = f"{CIFAR10.base_folder}/{{data_batch_1..5,test_batch,batches.meta}}"
        how = f"download {CIFAR10.filename} from {CIFAR10.url} and extract it there, or run with network access"
        return _message("CIFAR-10", root, expected, how, _CIFAR10_FILES, present, load_error, download_error)

    return _open(build, fetch if download else None, message)


def _open(build, fetch, message):
    """build() if it can read the files; else fetch() (when given) and build() again; else a one-line error."""
    download_error = None
    try:
        return build()
    except _UNREADABLE as e:
        load_error = _one_line(e)
    if fetch is not None:
        try:
            fetch()
        except Exception as e:  # no network shows up as URLError, RuntimeError, socket or SSL errors, ...
            download_error = _one_line(e)
        try:
            return build()
        except _UNREADABLE as e:
            load_error = _one_line(e)
    raise DatasetNotFoundError(message(load_error, download_error)) from None


def _message(title, folder, expected, how, files, present, load_error, download_error):
    if len(present) == len(files):
        head = f"{title} in {folder} is unreadable or corrupted ({load_error})"
    else:
        missing = [f for f in files if f not in present]
        head = f"{title} not found in {folder}" + (f" (missing: {', '.join(missing)})" if present else "")
    tail = f" (download failed: {download_error})" if download_error else ""
    return f"{head}: expected {expected}; {how}{tail}"


def _check_idx_files(folder):
    """ValueError naming the file for an IDX header that is not MNIST's (magic 2051 / 2049, uint8, 3 / 1
    dimensions) or a size that does not match it. Absent files are left to torchvision's check."""
    for name in _MNIST_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        dims = 3 if "images" in name else 1
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            header = fh.read(4 + 4 * dims)
        if len(header) < 4 + 4 * dims:
            raise ValueError(f"{name} holds {size} bytes, shorter than its header")
        magic, *shape = struct.unpack(f">{1 + dims}I", header)
        expected_magic = 0x0800 + dims  # uint8 data (0x08), `dims` dimensions
        if magic != expected_magic:
            raise ValueError(f"{name} starts with magic number {magic}, expected {expected_magic}")
        expected_size = len(header) + math.prod(shape)
        if size != expected_size:
            raise ValueError(f"{name} holds {size} bytes, its header {shape} says {expected_size}")


def _check_images(data, targets, info, channels_last):
    """Shape and length checks torchvision leaves out (a wrong-sized IDX file would load as other images)."""
    data = torch.as_tensor(data)
    c, h, w = info.shape
    shape = (h, w, c) if channels_last else (h, w)
    if data.dtype != torch.uint8 or tuple(data.shape[1:]) != shape or len(data) != len(targets) or len(data) == 0:
        raise ValueError(f"read {len(data)} images of shape {tuple(data.shape[1:])} ({data.dtype}) and "
                         f"{len(targets)} labels; expected uint8 images of shape {shape}, one label each")


def _gunzip_absent(folder, names):
    """Decompress name.gz to name wherever only the .gz is there (as torchvision's download would)."""
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path) and os.path.isfile(path + ".gz"):
            partial = path + ".partial"
            try:
                with gzip.open(path + ".gz", "rb") as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except BaseException:
                if os.path.exists(partial):
                    os.remove(partial)
                raise
            os.replace(partial, path)  # never leave a half-written file under the final name


def _exists(folder, name):
    return os.path.isfile(os.path.join(folder, name))


def _one_line(e, limit=200):
    text = " ".join(str(e).split()) or "no message"
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _positive_int(value, name):
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _non_negative_int(value, name):
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_rank(rank, world_size):
    world_size = _positive_int(world_size, "world_size")
    rank = _non_negative_int(rank, "rank")
    if rank >= world_size:
        raise ValueError(f"rank={rank} must be below world_size={world_size}")
    return rank, world_size
