"""Tiny MNIST and CIFAR-10 data sets of random pixels, written in torchvision's exact on-disk formats
(lib/image_files.py), so the real ``torchvision.datasets.MNIST`` / ``CIFAR10`` classes read them
(download=False) and tests exercise the same code path as real data. Every writer returns the exact
pixels it wrote, as uint8 arrays (N, C, H, W), the layout the data sets in ``lib.image_data`` yield.
torchvision checks CIFAR-10's md5 sums: load inside ``fake_cifar10_checksums(root)``.
"""
import os
from typing import NamedTuple

import numpy as np

from lib.image_files import cifar10_checksums as fake_cifar10_checksums  # noqa: F401 (the tests import it from here)
from lib.image_files import write_cifar10, write_mnist


class FakeImages(NamedTuple):
    train_images: np.ndarray  # uint8 (N_train, C, H, W)
    train_labels: np.ndarray  # int64 (N_train,)
    test_images: np.ndarray   # uint8 (N_test, C, H, W)
    test_labels: np.ndarray   # int64 (N_test,)


def write_fake_mnist(root, n_train=64, n_test=32, seed=0, gz=False):
    """IDX files under root/MNIST/raw/ (root = the ``root`` torchvision's MNIST takes)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (n_train, n_test):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        out += [images[:, None], labels.astype(np.int64)]
    write_mnist(root, *out, gz=gz)
    return FakeImages(*out)


def write_fake_cifar10(root, n_per_batch=10, seed=0):
    """Pickled batches under root/cifar-10-batches-py/ (root = the ``root`` torchvision's CIFAR10 takes).

    Training images: the five data batches concatenated in order; n_per_batch images in every batch,
    the test batch included.
    """
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(6):
        images.append(rng.integers(0, 256, size=(n_per_batch, 3, 32, 32), dtype=np.uint8))  # (N, C, H, W)
        labels.append(np.asarray(rng.integers(0, 10, size=n_per_batch).tolist(), dtype=np.int64))
    fake = FakeImages(np.concatenate(images[:-1]), np.concatenate(labels[:-1]), images[-1], labels[-1])
    write_cifar10(root, *fake)
    return fake


def write_fake_image_dataset(name, dataroot, seed=0):
    """The fake set for ``lib.image_data.load_image_datasets(name, dataroot)``, at the path it looks in."""
    if name == "mnist":
        return write_fake_mnist(dataroot, seed=seed)
    if name == "cifar":
        return write_fake_cifar10(os.path.join(dataroot, "cifar10"), seed=seed)
    raise ValueError(f"unknown dataset {name!r}: expected cifar or mnist")
