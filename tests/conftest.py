"""Shared fixtures: tiny timm ViTs, Fashion-MNIST slices and small image folders.

Everything is seeded and small so the whole suite runs in minutes on 2 CPU cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dinokit.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep torch.hub / HF caches inside a temp dir and never touch the network."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("TORCH_HOME", str(cache / "torch"))
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DINOKIT_CACHE", str(cache / "dinokit"))


@pytest.fixture(autouse=True, scope="session")
def _fp32_embedding_on_every_cpu() -> Iterator[None]:
    """embed's automatic precision is bf16 on CPUs with native bf16 and fp32 on the others; tests compare
    embed with fp32 references at tight tolerances, so the whole session (and the CLI processes it
    starts) pins "auto" to fp32 on every machine (tests/test_embed_onnx.py checks the choice itself)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DINOKIT_EMBED_PRECISION", "fp32")
        yield


def make_tiny_vit(seed: int = 0, img_size: int = 32, patch_size: int = 8, depth: int = 2,
                  embed_dim: int = 48, num_heads: int = 3) -> torch.nn.Module:
    """A seeded tiny timm ViT in eval mode: model(x) -> (B, embed_dim) CLS features."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True,
        img_size=img_size, patch_size=patch_size, depth=depth, embed_dim=embed_dim, num_heads=num_heads,
    )
    return model.eval()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test on one torch thread: for tiny tensors thread hand-offs cost more than the math."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_faiss_thread() -> Iterator[None]:
    """FAISS on one OpenMP thread (tiny indexes: more threads only spin-wait on 2 shared cores)."""
    from dinokit.retrieval.kinds import faiss, set_num_threads

    before = faiss.omp_get_max_threads()
    set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture
def tiny_vit() -> torch.nn.Module:
    return make_tiny_vit()


@pytest.fixture(scope="session")
def fmnist_root() -> Path:
    if not (DEFAULT_ROOT / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"{DEFAULT_ROOT}: Fashion-MNIST missing; run `apt-get install -y dataset-fashion-mnist`")
    return DEFAULT_ROOT


@pytest.fixture(scope="session")
def fmnist_small(fmnist_root: Path) -> dict[str, np.ndarray]:
    """First 1000 train and 200 test images with labels (uint8 (N, 28, 28), int64 (N,))."""
    xtr, ytr = load_fashion_mnist("train", fmnist_root, limit=1000)
    xte, yte = load_fashion_mnist("test", fmnist_root, limit=200)
    return {"train_x": xtr, "train_y": ytr, "test_x": xte, "test_y": yte}


def write_image_folder(root: Path, images: np.ndarray, labels: np.ndarray, ext: str = "png") -> Path:
    """Write grayscale uint8 images as ``root/<class>/<i>.<ext>`` and return ``root``."""
    from PIL import Image

    from dinokit.data.fashion_mnist import CLASSES

    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        d = root / CLASSES[int(lab)].replace("/", "-")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.{ext}")
    return root


@pytest.fixture(scope="session")
def fmnist_folders(tmp_path_factory: pytest.TempPathFactory, fmnist_small: dict[str, np.ndarray]) -> dict[str, Path]:
    """Class-subfolder PNG folders: 200 train and 60 val Fashion-MNIST images."""
    base = tmp_path_factory.mktemp("fmnist_png")
    train = write_image_folder(base / "train", fmnist_small["train_x"][:200], fmnist_small["train_y"][:200])
    val = write_image_folder(base / "val", fmnist_small["test_x"][:60], fmnist_small["test_y"][:60])
    return {"train": train, "val": val}
