import gzip

import numpy as np
import pytest

from dinokit.data.fashion_mnist import load_fashion_mnist, load_spec, parse_spec


def test_real_files_shapes_and_labels(fmnist_root):
    x, y = load_fashion_mnist("test", fmnist_root)
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and set(np.unique(y)) == set(range(10))
    # the test split is balanced: 1000 images per class
    assert np.bincount(y).tolist() == [1000] * 10


def test_spec_parsing_and_slice(fmnist_root):
    s = parse_spec(f"fashion-mnist:{fmnist_root}@test#5")
    assert (s.root, s.split, s.limit) == (fmnist_root, "test", 5)
    assert parse_spec("fashion-mnist", default_split="test").split == "test"
    x, y = load_spec("fashion-mnist#7")
    assert x.shape == (7, 28, 28) and y.shape == (7,)
    with pytest.raises(ValueError, match="fashion-mnist:nope@val"):
        parse_spec("fashion-mnist:nope@val")


def test_truncated_file_is_a_clear_error(tmp_path):
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"\x00" * 10)
    with pytest.raises(ValueError, match="truncated IDX"):
        load_fashion_mnist("test", tmp_path)
    with pytest.raises(FileNotFoundError, match="train-images"):
        load_fashion_mnist("train", tmp_path)
