"""Image data: torchvision's real MNIST / CIFAR10 classes on fake files, exact 8-bit pixels, batch flips (random_hflip), one-line errors for missing data,
the resumable training sampler and the loaders."""
import itertools
import math
import os
import pickle
from urllib.error import URLError

import pytest
import torch
import torchvision
from torch.utils.data import TensorDataset

from lib.image_data import (DatasetNotFoundError, EpochShuffleSampler, load_image_datasets, random_hflip, test_loader,
                            train_loader)
from lib.pixels import dequantize
from tests.fake_datasets import fake_cifar10_checksums, write_fake_cifar10, write_fake_mnist


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the network: every download attempt fails at once, as it does offline."""
    def refuse(*args, **kwargs):
        raise URLError("network disabled in tests")
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", refuse)
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", refuse)


@pytest.fixture
def cifar(tmp_path):
    """(dataroot, pixels written) for a fake CIFAR-10 that torchvision accepts inside the test."""
    written = write_fake_cifar10(tmp_path / "cifar10", n_per_batch=40)
    with fake_cifar10_checksums(tmp_path / "cifar10"):
        yield tmp_path, written


def stack(dataset):
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels)


# --- reading the files ------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_mnist_pixels_and_labels_round_trip_exactly(tmp_path, gz):
    written = write_fake_mnist(tmp_path, n_train=20, n_test=10, gz=gz)
    train_set, test_set, info = load_image_datasets("mnist", tmp_path, download=False)
    assert isinstance(train_set, torchvision.datasets.MNIST)
    assert (info.channels, info.height, info.width, info.dim, info.hflip) == (1, 28, 28, 784, False)
    for dataset, images, labels in [(train_set, written.train_images, written.train_labels),
                                    (test_set, written.test_images, written.test_labels)]:
        k, y = stack(dataset)
        assert k.dtype == torch.uint8 and k.shape == (len(images), 1, 28, 28)
        assert torch.equal(k, torch.from_numpy(images))
        assert torch.equal(y, torch.from_numpy(labels))


def test_mnist_known_pixel_from_the_idx_bytes(tmp_path):
    write_fake_mnist(tmp_path, n_train=5, n_test=5)
    _, test_set, _ = load_image_datasets("mnist", tmp_path, download=False)
    raw = (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes()
    i, r, c = 3, 7, 20  # image i, row r, column c: byte 16 + 784 i + 28 r + c after the 16-byte header
    assert test_set[i][0][0, r, c].item() == raw[16 + 784 * i + 28 * r + c]


def test_cifar_test_pixels_and_labels_round_trip_exactly(cifar):
    dataroot, written = cifar
    train_set, test_set, info = load_image_datasets("cifar", dataroot, download=False)
    assert isinstance(test_set, torchvision.datasets.CIFAR10)
    assert (info.channels, info.height, info.width, info.dim, info.hflip) == (3, 32, 32, 3072, True)
    assert len(train_set) == 200 and len(test_set) == 40
    k, y = stack(test_set)
    assert k.dtype == torch.uint8 and k.shape == (40, 3, 32, 32)
    assert torch.equal(k, torch.from_numpy(written.test_images))
    assert torch.equal(y, torch.from_numpy(written.test_labels))
    assert torch.equal(torch.tensor(train_set.targets), torch.from_numpy(written.train_labels))


def test_cifar_channel_layout_known_pixel_from_the_pickle(cifar):
    dataroot, _ = cifar
    _, test_set, _ = load_image_datasets("cifar", dataroot, download=False)
    with open(dataroot / "cifar10" / "cifar-10-batches-py" / "test_batch", "rb") as f:
        row = pickle.load(f, encoding="latin1")["data"][5]  # (3072,) = R plane, G plane, B plane, row-major
    r, c = 4, 29
    rgb = [row[plane * 1024 + 32 * r + c] for plane in range(3)]
    assert test_set[5][0][:, r, c].tolist() == rgb


def test_unknown_dataset_name_is_rejected_naming_the_allowed_values(tmp_path):
    with pytest.raises(ValueError, match="cifar, mnist"):
        load_image_datasets("svhn", tmp_path)


# --- flips ------------------------------------------------------------------------------

def distinct_asymmetric_images(n, dtype=torch.float32):
    """(n, 2, 3, 4) images, no two alike and none equal to its own mirror (column 0 != column 3)."""
    base = torch.arange(2 * 3 * 4).view(1, 2, 3, 4) + 5 * torch.arange(n).view(n, 1, 1, 1)
    return (base % 256).to(dtype)


def which_flipped(out, x):
    """(B,) bool: image i of out is the mirror of x's; asserts each is x's image or its mirror."""
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert torch.all(same ^ mirrored)  # exactly one of the two (the images are asymmetric)
    return mirrored


def test_random_hflip_flips_about_half_the_images_each_wholly_or_not_at_all():
    x = distinct_asymmetric_images(4000)
    out = random_hflip(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    flipped = which_flipped(out, x)  # every channel and row of an image flipped together, or none
    n = len(x)
    # Binomial(n, 1/2): within 4 standard deviations sqrt(n / 4) = 31.6 of n / 2 = 2000
    assert abs(flipped.sum().item() - n / 2) < 4 * math.sqrt(n / 4)


def test_random_hflip_is_reproducible_from_the_generator():
    x = distinct_asymmetric_images(64, dtype=torch.uint8)
    a, b, c = (random_hflip(x, generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(which_flipped(a, x), which_flipped(b, x))


def test_data_sets_never_flip_cifar_and_mnist_train_and_test(cifar):
    dataroot, written = cifar
    mnist_written = write_fake_mnist(dataroot, n_train=30, n_test=20)
    for name, w in [("cifar", written), ("mnist", mnist_written)]:
        train_set, test_set, _ = load_image_datasets(name, dataroot, download=False)
        for global_seed in (0, 1):  # whatever torch's global RNG holds
            torch.manual_seed(global_seed)
            assert torch.equal(stack(train_set)[0], torch.from_numpy(w.train_images))
            assert torch.equal(stack(test_set)[0], torch.from_numpy(w.test_images))


# --- missing, partial, corrupted --------------------------------------------------------

def assert_one_line_naming(message, *parts):
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


@pytest.mark.parametrize("download", [False, True])
def test_missing_mnist_gives_one_line_naming_folder_and_files(tmp_path, download):
    with pytest.raises(DatasetNotFoundError) as e:
        load_image_datasets("mnist", tmp_path, download=download)
    assert_one_line_naming(str(e.value), str(tmp_path / "MNIST" / "raw"), "train-images-idx3-ubyte",
                           "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    assert ("download failed" in str(e.value)) == download


@pytest.mark.parametrize("download", [False, True])
def test_missing_cifar_gives_one_line_naming_folder_and_files(tmp_path, download):
    with pytest.raises(DatasetNotFoundError) as e:
        load_image_datasets("cifar", tmp_path, download=download)
    assert_one_line_naming(str(e.value), str(tmp_path / "cifar10"), "cifar-10-batches-py",
                           "data_batch_1..5", "test_batch", "batches.meta", "cifar-10-python.tar.gz")
    assert ("download failed" in str(e.value)) == download


def test_partial_cifar_names_the_missing_file(cifar):
    dataroot, _ = cifar
    os.remove(dataroot / "cifar10" / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(DatasetNotFoundError) as e:
        load_image_datasets("cifar", dataroot)
    assert_one_line_naming(str(e.value), "missing: data_batch_3", "download failed")


def test_corrupted_cifar_names_the_file_failing_its_checksum(cifar):
    dataroot, _ = cifar
    path = dataroot / "cifar10" / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetNotFoundError) as e:
        load_image_datasets("cifar", dataroot)
    assert_one_line_naming(str(e.value), "corrupted", "test_batch")


def test_unreadable_cifar_pickle_with_right_checksum_gives_one_line(tmp_path):
    write_fake_cifar10(tmp_path / "cifar10", n_per_batch=2)
    (tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle")
    with fake_cifar10_checksums(tmp_path / "cifar10"):
        with pytest.raises(DatasetNotFoundError) as e:
            load_image_datasets("cifar", tmp_path, download=False)
    assert_one_line_naming(str(e.value), "unreadable", str(tmp_path / "cifar10"))


@pytest.mark.parametrize("damage", ["truncate", "wrong_size", "empty", "bad_magic", "float_type", "short_header"])
def test_damaged_mnist_gives_one_line(tmp_path, damage):
    """Among them headers that torchvision's parser answers with AssertionError (bad magic), TypeError (a float
    type code) or ValueError: they are refused before it parses them."""
    write_fake_mnist(tmp_path, n_train=6, n_test=4)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[:-50],
                      "wrong_size": data[:8] + (14).to_bytes(4, "big") + (56).to_bytes(4, "big") + data[16:],
                      "empty": b"",
                      "bad_magic": (0x0F03).to_bytes(4, "big") + data[4:],
                      "float_type": (0x0D03).to_bytes(4, "big") + data[4:],
                      "short_header": data[:10]}[damage])
    with pytest.raises(DatasetNotFoundError) as e:
        load_image_datasets("mnist", tmp_path)  # download=True: the files are there, so nothing to fetch
    assert_one_line_naming(str(e.value), "unreadable or corrupted", str(tmp_path / "MNIST" / "raw"))


@pytest.mark.parametrize("error", [TypeError, KeyError, AssertionError, IndexError])
def test_a_programming_error_while_reading_propagates_instead_of_reading_as_missing_data(tmp_path, monkeypatch,
                                                                                          error):
    """Only what missing or damaged files raise is reported as unreadable data; a bug in the reading code (here
    one planted in the image check) must surface as itself."""
    import lib.image_data

    write_fake_mnist(tmp_path, n_train=6, n_test=4)

    def bug(*args, **kwargs):
        raise error("a bug")

    monkeypatch.setattr(lib.image_data, "_check_images", bug)
    with pytest.raises(error, match="a bug"):
        load_image_datasets("mnist", tmp_path, download=False)


def test_partial_mnist_names_the_missing_file(tmp_path):
    write_fake_mnist(tmp_path, n_train=6, n_test=4)
    os.remove(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")
    with pytest.raises(DatasetNotFoundError) as e:
        load_image_datasets("mnist", tmp_path, download=False)
    assert_one_line_naming(str(e.value), "missing: t10k-labels-idx1-ubyte")


# --- the training sampler ---------------------------------------------------------------

def batches(sampler, count):
    return [list(b) for b in itertools.islice(iter(sampler), count)]


def epochs(sampler, count):
    """The first ``count`` epochs of ``sampler``, each the concatenation of its batches."""
    per_epoch = sampler.batches_per_epoch
    flat = batches(sampler, count * per_epoch)
    return [sum(flat[e * per_epoch:(e + 1) * per_epoch], []) for e in range(count)]


def test_each_epoch_is_a_permutation_with_drop_last():
    # 50 examples, batches of 8: 6 full batches per epoch, the 2 examples left over are dropped
    sampler = EpochShuffleSampler(50, 8, seed=0)
    assert sampler.batches_per_epoch == 6
    assert all(len(b) == 8 for b in batches(sampler, 30))
    orders = epochs(sampler, 5)
    for order in orders:
        assert len(order) == 48 and len(set(order)) == 48 and set(order) <= set(range(50))
    assert set().union(*orders) == set(range(50))  # a fresh permutation: other examples left out next time
    assert len({tuple(o) for o in orders}) == 5  # every epoch in another order
    # n divisible by the batch: every epoch is a permutation of all the examples
    assert all(sorted(order) == list(range(48)) for order in epochs(EpochShuffleSampler(48, 8, seed=0), 3))


def test_sampler_order_follows_the_seed():
    a, b, c = (batches(EpochShuffleSampler(50, 8, seed=s), 12) for s in (0, 0, 1))
    assert a == b and a != c


@pytest.mark.parametrize("start", [1, 4, 6, 11, 13])  # 6 batches per epoch: 4 and 11 run across a boundary
def test_starting_at_batch_b_gives_exactly_the_tail_of_the_run_from_zero(start):
    full = batches(EpochShuffleSampler(50, 8, seed=3), 20)
    resumed = batches(EpochShuffleSampler(50, 8, seed=3, start_batch=start), 20 - start)
    assert resumed == full[start:]


def test_rank_shards_are_disjoint_and_make_up_the_global_batch():
    full = batches(EpochShuffleSampler(50, 8, seed=5), 14)
    shards = [batches(EpochShuffleSampler(50, 8, seed=5, rank=r, world_size=2), 14) for r in (0, 1)]
    for b, global_batch in enumerate(full):
        s0, s1 = shards[0][b], shards[1][b]
        assert len(s0) == len(s1) == 4
        assert not set(s0) & set(s1)
        assert sorted(s0 + s1) == sorted(global_batch)
    # resuming a rank gives the tail of that rank's own sequence
    assert batches(EpochShuffleSampler(50, 8, seed=5, start_batch=5, rank=1, world_size=2), 9) == shards[1][5:]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_examples=50, batch_size=6, world_size=4), "divisible"),
    (dict(num_examples=50, batch_size=51), "exceeds the 50"),
    (dict(num_examples=50, batch_size=0), "batch_size"),
    (dict(num_examples=50, batch_size=8, rank=2, world_size=2), "rank"),
    (dict(num_examples=50, batch_size=8, start_batch=-1), "start_batch"),
])
def test_sampler_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        EpochShuffleSampler(**kwargs)
    assert "\n" not in str(e.value)


# --- loaders ----------------------------------------------------------------------------

def take(loader, count):
    return list(itertools.islice(iter(loader), count))


def test_train_loader_yields_full_uint8_image_batches_reproducible_from_the_seed(cifar):
    dataroot, written = cifar
    train_set, _, info = load_image_datasets("cifar", dataroot, download=False)
    images = torch.from_numpy(written.train_images)
    run = take(train_loader(train_set, 16, seed=0), 14)  # 200 examples: 12 batches per epoch, into the 2nd
    for k, y in run:
        assert k.dtype == torch.uint8 and k.shape == (16, *info.shape) and y.shape == (16,)
    x = dequantize(run[0][0], generator=torch.Generator().manual_seed(0))
    assert torch.equal((x * 256).floor().to(torch.uint8), run[0][0])
    # the examples the sampler picks, unflipped
    indices = batches(EpochShuffleSampler(len(train_set), 16, seed=0), 14)
    assert all(torch.equal(k, images[i]) for (k, _), i in zip(run, indices))
    # same seed: same batches; resumed at iteration 10: the tail; other seed: other batches
    again = take(train_loader(train_set, 16, seed=0), 14)
    resumed = take(train_loader(train_set, 16, seed=0, start_iteration=10), 4)
    other = take(train_loader(train_set, 16, seed=1), 14)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(run, again))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(run[10:], resumed))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(run, other))
    # sharded: each rank gets its half of every global batch
    half = take(train_loader(train_set, 16, seed=0, rank=1, world_size=2), 3)
    assert all(k.shape == (8, *info.shape) and torch.equal(k, images[i[1::2]]) for (k, _), i in zip(half, indices))


def test_train_loader_with_workers_gives_the_same_batches():
    data = TensorDataset(torch.arange(50))
    serial = [b for (b,) in take(train_loader(data, 8, seed=2, start_iteration=3), 8)]
    workers = [b for (b,) in take(train_loader(data, 8, seed=2, start_iteration=3, num_workers=2), 8)]
    assert all(torch.equal(a, b) for a, b in zip(serial, workers)) and len(workers) == 8


def test_loaders_leave_the_global_rng_alone():
    data = TensorDataset(torch.arange(50))
    state = torch.get_rng_state()
    take(train_loader(data, 8, seed=4), 3)
    take(test_loader(data, 8), 3)
    assert torch.equal(torch.get_rng_state(), state)


def test_test_loader_keeps_every_example_in_order():
    data = TensorDataset(torch.arange(50))
    loader = test_loader(data, test_batch_size=16)
    assert [len(b) for (b,) in loader] == [16, 16, 16, 2]
    assert torch.cat([b for (b,) in loader]).tolist() == list(range(50))


def test_test_subset_gives_exactly_the_first_n_examples():
    data = TensorDataset(torch.arange(50))
    assert torch.cat([b for (b,) in test_loader(data, 4, test_subset=7)]).tolist() == list(range(7))
    with pytest.raises(ValueError, match="test_subset"):
        test_loader(data, 4, test_subset=51)


@pytest.mark.parametrize("world_size, test_subset", [(2, None), (3, 20), (4, 50), (3, 2)])
def test_sharded_test_sets_are_the_single_process_batches_dealt_round_robin(world_size, test_subset):
    data = TensorDataset(torch.arange(50))
    n = 50 if test_subset is None else test_subset
    single = [b.tolist() for (b,) in test_loader(data, 4, test_subset=test_subset)]
    shards = [[b.tolist() for (b,) in test_loader(data, 4, test_subset=test_subset, rank=r, world_size=world_size)]
              for r in range(world_size)]
    # rank r's i-th batch is global batch r + i * world_size, holding the same examples as in one process
    assert all(batch == single[r + i * world_size] for r, shard in enumerate(shards) for i, batch in enumerate(shard))
    every = [x for shard in shards for batch in shard for x in batch]
    assert sorted(every) == list(range(n))  # each example once: no padding, no duplicates


def test_sharded_cifar_test_images_are_the_written_ones(cifar):
    dataroot, written = cifar
    _, test_set, info = load_image_datasets("cifar", dataroot, download=False)
    images = torch.from_numpy(written.test_images)
    # 30 examples in batches of 8: rank 0 gets batches 0 and 2 (examples 0-7, 16-23), rank 1 batches 1 and 3
    expected = [torch.cat([images[0:8], images[16:24]]), torch.cat([images[8:16], images[24:30]])]
    for r in range(2):
        k = torch.cat([k for k, _ in test_loader(test_set, 8, test_subset=30, rank=r, world_size=2)])
        assert k.dtype == torch.uint8 and torch.equal(k, expected[r])


@pytest.mark.parametrize("kwargs, match", [
    (dict(test_batch_size=0), "test_batch_size"),
    (dict(test_batch_size=4, rank=3, world_size=3), "rank"),
    (dict(test_batch_size=4, world_size=0), "world_size"),
    (dict(test_batch_size=4, test_subset=0), "test_subset"),
])
def test_test_loader_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        test_loader(TensorDataset(torch.arange(5)), **kwargs)


def test_train_loader_options_are_validated():
    data = TensorDataset(torch.arange(5))
    with pytest.raises(ValueError, match="batch_size"):
        train_loader(data, batch_size=6)
    with pytest.raises(ValueError, match="divisible"):
        train_loader(data, batch_size=3, world_size=2)
    with pytest.raises(ValueError, match="start_iteration"):
        train_loader(data, batch_size=2, start_iteration=-1)
