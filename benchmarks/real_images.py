"""Real images that ship inside pip packages, written in MNIST's and CIFAR-10's on-disk layouts (lib/image_files.py)
so that train_img.py reads them with torchvision's own classes (nothing here can be downloaded).

  digits   scikit-learn's 1797 hand-written 8x8 digits (values 0..16), upsampled bilinearly to 28x28 and scaled
           to 0..255: the MNIST configuration. A fixed shuffle; the last `n_test` are the test set.
  photos   32x32 RGB patches cut at random from scikit-image's sample photographs (astronaut, coffee, chelsea,
           rocket, hubble_deep_field, immunohistochemistry), each first shrunk by 2 so a patch holds structure
           rather than one flat colour: the CIFAR-10 layout. Training patches come from the left 80% of every
           photograph and test patches from the right 20%, so no test patch overlaps a training one.

Needs scikit-learn and scikit-image (requirements-bench.txt).
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

from lib.image_files import write_cifar10, write_mnist

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def digit_images(seed=0):
    """(images uint8 (1797, 1, 28, 28), labels (1797,)) in a fixed random order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float()[:, None] / 16  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    order = np.random.default_rng(seed).permutation(len(images))
    return images[order], digits.target[order]


def write_digits(dataroot, n_test=297, seed=0):
    """The digits under <dataroot>/MNIST/raw; returns the numbers of training and test images."""
    images, labels = digit_images(seed)
    n_train = len(images) - n_test
    write_mnist(dataroot, images[:n_train], labels[:n_train], images[n_train:], labels[n_train:])
    return n_train, n_test


def photo_patches(n, region, seed=0):
    """n patches (uint8 (n, 3, 32, 32)) from the `region` ('train': left 80%, 'test': right 20%) of the photographs,
    as many from each; labels are the photograph's index."""
    import skimage.data

    rng = np.random.default_rng(seed)
    per_photo = -(-n // len(PHOTOS))
    patches, labels = [], []
    for index, name in enumerate(PHOTOS):
        photo = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float()[None]  # (1, 3, H, W)
        photo = F.avg_pool2d(photo, 2)[0]  # (3, H/2, W/2)
        width = photo.shape[2]
        cut = int(0.8 * width)
        lo, hi = (0, cut - 32) if region == "train" else (cut, width - 32)
        rows = rng.integers(0, photo.shape[1] - 32 + 1, per_photo)
        cols = rng.integers(lo, hi + 1, per_photo)
        patches += [photo[:, r:r + 32, c:c + 32] for r, c in zip(rows, cols)]
        labels += [index] * per_photo
    images = torch.stack(patches).round().clamp(0, 255).to(torch.uint8).numpy()[:n]
    return images, np.asarray(labels[:n]) % 10


def write_photos(dataroot, n_train=3000, n_test=300, seed=0):
    """The patches under <dataroot>/cifar10/cifar-10-batches-py; read them inside
    lib.image_files.cifar10_checksums(<dataroot>/cifar10). Returns the numbers of training and test images."""
    train = photo_patches(n_train, "train", seed)
    test = photo_patches(n_test, "test", seed + 1)
    write_cifar10(os.path.join(dataroot, "cifar10"), *train, *test)
    return n_train, n_test
