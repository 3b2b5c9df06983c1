"""Images written in torchvision's own on-disk formats, so its MNIST and CIFAR10 classes read them as they read
the real data sets: for data sets of your own in these layouts, the tests' synthetic sets and the benchmarks'
real photographs and digits (benchmarks/real_images.py).

Formats (as torchvision 0.29 reads them):
  * MNIST: <root>/MNIST/raw/{train,t10k}-images-idx3-ubyte and -labels-idx1-ubyte, IDX files with a
    big-endian header: magic 2051 (= 0x0803: uint8, 3 dims), N, 28, 28, then the pixels row-major;
    labels: magic 2049 (uint8, 1 dim), N, then one byte per label. torchvision's ``_check_exists``
    wants the uncompressed files; ``gz=True`` writes only the .gz ones (as downloaded by hand).
  * CIFAR-10: <root>/cifar-10-batches-py/data_batch_1..5, test_batch: pickled dicts whose 'data' is
    uint8 (N, 3072), each row the red, green then blue 32x32 planes, row-major; 'labels' a list of
    ints. batches.meta: 'label_names'. torchvision unpickles with encoding='latin1', under which the
    original Python 2 files have str keys, so str keys are what it reads.
    torchvision checks each file's md5 against the real data set's: read files of your own inside
    ``cifar10_checksums(root)``, which makes it expect their sums (the check still runs).
"""
import contextlib
import gzip
import hashlib
import os
import pickle
import struct
from unittest import mock

import numpy as np
from torchvision.datasets import CIFAR10

CIFAR10_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_mnist(root, train_images, train_labels, test_images, test_labels, gz=False):
    """IDX files under root/MNIST/raw/ (root = the ``root`` torchvision's MNIST takes).

    images: uint8 arrays (N, 28, 28) or (N, 1, 28, 28); labels: integers 0..9, (N,).
    """
    folder = os.path.join(root, "MNIST", "raw")
    os.makedirs(folder, exist_ok=True)
    for split, images, labels in (("train", train_images, train_labels), ("t10k", test_images, test_labels)):
        images = _uint8(images).reshape(-1, 28, 28)
        n = images.shape[0]
        _write(os.path.join(folder, f"{split}-images-idx3-ubyte"), struct.pack(">IIII", 2051, n, 28, 28)
               + images.tobytes(), gz)
        _write(os.path.join(folder, f"{split}-labels-idx1-ubyte"),
               struct.pack(">II", 2049, n) + np.asarray(labels, dtype=np.uint8).tobytes(), gz)


def write_cifar10(root, train_images, train_labels, test_images, test_labels):
    """Pickled batches under root/cifar-10-batches-py/ (root = the ``root`` torchvision's CIFAR10 takes).

    images: uint8 (N, 3, 32, 32); labels: integers 0..9, (N,). The training images are cut into the five
    data batches in order (the first ones one image larger when N is not a multiple of 5).
    """
    folder = os.path.join(root, CIFAR10.base_folder)
    os.makedirs(folder, exist_ok=True)
    names = [f for f, _ in CIFAR10.train_list]
    parts = list(zip(np.array_split(_uint8(train_images), 5), np.array_split(np.asarray(train_labels), 5), names))
    parts.append((_uint8(test_images), np.asarray(test_labels), CIFAR10.test_list[0][0]))
    for i, (x, y, name) in enumerate(parts):
        n = x.shape[0]
        batch = {
            "batch_label": f"batch {i + 1}",
            "labels": [int(v) for v in y],
            "data": x.reshape(n, 3 * 32 * 32),  # R plane, G plane, B plane, each row-major
            "filenames": [f"image_{i}_{j}.png" for j in range(n)],
        }
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {"num_cases_per_batch": parts[0][0].shape[0], "label_names": CIFAR10_LABEL_NAMES, "num_vis": 3 * 32 * 32}
    with open(os.path.join(folder, CIFAR10.meta["filename"]), "wb") as f:
        pickle.dump(meta, f, protocol=2)


@contextlib.contextmanager
def cifar10_checksums(root):
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


def _uint8(images):
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8 arrays of pixel values 0..255, got dtype {images.dtype}")
    return images


def _write(path, data, gz):
    if gz:
        with gzip.open(path + ".gz", "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)
