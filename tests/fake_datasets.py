"""Tiny MNIST and CIFAR-10 data sets written in torchvision's exact on-disk formats.

The real ``torchvision.datasets.MNIST`` / ``CIFAR10`` classes read them (download=False), so tests
exercise the same code path as real data. Every writer returns the exact pixels it wrote, as
uint8 arrays (N, C, H, W), the layout the data sets in ``lib.image_data`` yield.

Formats (as torchvision 0.29 reads them):
  * MNIST: <root>/MNIST/raw/{train,t10k}-images-idx3-ubyte and -labels-idx1-ubyte, IDX files with a
    big-endian header: magic 2051 (= 0x0803: uint8, 3 dims), N, 28, 28, then the pixels row-major;
    labels: magic 2049 (uint8, 1 dim), N, then one byte per label. torchvision's ``_check_exists``
    wants the uncompressed files; ``gz=True`` writes only the .gz ones (as downloaded by hand).
  * CIFAR-10: <root>/cifar-10-batches-py/data_batch_1..5, test_batch: pickled dicts whose 'data' is
    uint8 (N, 3072), each row the red, green then blue 32x32 planes, row-major; 'labels' a list of
    ints. batches.meta: 'label_names'. torchvision unpickles with encoding='latin1', under which the
    original Python 2 files have str keys, so str keys are what it reads.
    torchvision checks each file's md5 against the real data set's: wrap the load in
    ``fake_cifar10_checksums(root)``, which makes it expect the fake files' sums (the check still runs).
"""
import contextlib
import gzip
import hashlib
import os
import pickle
import struct
from typing import NamedTuple
from unittest import mock

import numpy as np
from torchvision.datasets import CIFAR10

CIFAR10_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class FakeImages(NamedTuple):
    train_images: np.ndarray  # uint8 (N_train, C, H, W)
    train_labels: np.ndarray  # int64 (N_train,)
    test_images: np.ndarray   # uint8 (N_test, C, H, W)
    test_labels: np.ndarray   # int64 (N_test,)


def write_fake_mnist(root, n_train=64, n_test=32, seed=0, gz=False):
    """IDX files under root/MNIST/raw/ (root = the ``root`` torchvision's MNIST takes)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "MNIST", "raw")
    os.makedirs(folder, exist_ok=True)
    out = []
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write(os.path.join(folder, f"{split}-images-idx3-ubyte"), struct.pack(">IIII", 2051, n, 28, 28)
               + images.tobytes(), gz)
        _write(os.path.join(folder, f"{split}-labels-idx1-ubyte"), struct.pack(">II", 2049, n) + labels.tobytes(), gz)
        out += [images[:, None], labels.astype(np.int64)]
    return FakeImages(*out)


def write_fake_cifar10(root, n_per_batch=10, seed=0):
    """Pickled batches under root/cifar-10-batches-py/ (root = the ``root`` torchvision's CIFAR10 takes).

    Training images: the five data batches concatenated in order; n_per_batch images in every batch,
    the test batch included.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, CIFAR10.base_folder)
    os.makedirs(folder, exist_ok=True)
    images, labels = [], []
    for i, name in enumerate([f for f, _ in CIFAR10.train_list + CIFAR10.test_list]):
        x = rng.integers(0, 256, size=(n_per_batch, 3, 32, 32), dtype=np.uint8)  # (N, C, H, W)
        y = rng.integers(0, 10, size=n_per_batch).tolist()
        batch = {
            "batch_label": f"fake batch {i + 1}",
            "labels": y,
            "data": x.reshape(n_per_batch, 3 * 32 * 32),  # R plane, G plane, B plane, each row-major
            "filenames": [f"fake_{i}_{j}.png" for j in range(n_per_batch)],
        }
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
        images.append(x)
        labels.append(np.asarray(y, dtype=np.int64))
    meta = {"num_cases_per_batch": n_per_batch, "label_names": CIFAR10_LABEL_NAMES, "num_vis": 3 * 32 * 32}
    with open(os.path.join(folder, CIFAR10.meta["filename"]), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return FakeImages(np.concatenate(images[:-1]), np.concatenate(labels[:-1]), images[-1], labels[-1])


def write_fake_image_dataset(name, dataroot, seed=0):
    """The fake set for ``lib.image_data.load_image_datasets(name, dataroot)``, at the path it looks in."""
    if name == "mnist":
        return write_fake_mnist(dataroot, seed=seed)
    if name == "cifar":
        return write_fake_cifar10(os.path.join(dataroot, "cifar10"), seed=seed)
    raise ValueError(f"unknown dataset {name!r}: expected cifar or mnist")


@contextlib.contextmanager
def fake_cifar10_checksums(root):
    """Inside the block, torchvision's CIFAR10 expects the md5 sums of the files now under
    root/cifar-10-batches-py (real class, real check; only the expected sums change).

    Sums are taken on entry: a file changed inside the block fails the check, as a corrupted one
    would. Absent files keep the real sums (and stay absent).
    """
    folder = os.path.join(root, CIFAR10.base_folder)

    def md5_of(name, real):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return real
        with open(path, "rb") as f:
            return hashlib.md5(f.read()).hexdigest()

    train_list = [[name, md5_of(name, md5)] for name, md5 in CIFAR10.train_list]
    test_list = [[name, md5_of(name, md5)] for name, md5 in CIFAR10.test_list]
    meta = dict(CIFAR10.meta, md5=md5_of(CIFAR10.meta["filename"], CIFAR10.meta["md5"]))
    with mock.patch.object(CIFAR10, "train_list", train_list), mock.patch.object(CIFAR10, "test_list", test_list), \
            mock.patch.object(CIFAR10, "meta", meta):
        yield


def _write(path, data, gz):
    if gz:
        with gzip.open(path + ".gz", "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)
