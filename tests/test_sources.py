"""Image sources: folder, path list, CSV/parquet tables, WebDataset tars; the same bad-file handling."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_images import write_bad_files

from dinokit.data.sources import expand_braces, open_source, tar_paths
from dinokit.embedding import embed

NAMES = [f"img{i:02d}.png" for i in range(6)]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """6 small random RGB PNGs in tmp/imgs."""
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(7)
    for name in NAMES:
        Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(root / name)
    return root


def _ref(model: torch.nn.Module, root: Path) -> torch.Tensor:
    e = embed(model, root, batch_size=4, num_workers=0, image_size=32)
    assert e.paths == NAMES
    return e.features


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _write_tar(path: Path, root: Path, names: list[str], extra: dict[str, bytes] | None = None) -> None:
    """A WebDataset shard: per image a sample key/{png,txt,cls}."""
    with tarfile.open(path, "w") as tf:
        for name in names:
            key = f"s/{Path(name).stem}"
            _add(tf, f"{key}.txt", f"caption of {name}".encode())
            _add(tf, f"{key}.png", (root / name).read_bytes())
            _add(tf, f"{key}.cls", str(int(name[3:5]) % 3).encode())
        for name, data in (extra or {}).items():
            _add(tf, name, data)


def test_brace_and_glob_expansion(tmp_path: Path) -> None:
    assert expand_braces("a{08..11}b{x,y}.tar") == ["a08bx.tar", "a08by.tar", "a09bx.tar", "a09by.tar",
                                                    "a10bx.tar", "a10by.tar", "a11bx.tar", "a11by.tar"]
    assert expand_braces("s{3..1}.tar") == ["s3.tar", "s2.tar", "s1.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for n in ("b", "a", "c"):
        (tmp_path / f"{n}.tar").write_bytes(b"")
    assert [Path(p).name for p in tar_paths(str(tmp_path / "*.tar"))] == ["a.tar", "b.tar", "c.tar"]
    with pytest.raises(FileNotFoundError, match="no tar files match"):
        tar_paths(str(tmp_path / "*.nope.tar"))


def test_path_list_and_tables_match_the_folder(tmp_path: Path, images: Path, tiny_vit: torch.nn.Module) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ref = _ref(tiny_vit, images)
    order = [4, 0, 2]
    # a path list: relative to the list's folder, comments and blank lines ignored, order kept
    lst = tmp_path / "list.txt"
    lst.write_text("# three images\n" + "\n".join(f"imgs/{NAMES[i]}" for i in order) + "\n\n")
    e = embed(tiny_vit, lst, num_workers=0, image_size=32)
    assert e.paths == [f"imgs/{NAMES[i]}" for i in order] and e.metadata == {}
    torch.testing.assert_close(e.features, ref[order], atol=1e-6, rtol=0)
    # CSV: other columns become metadata, with their types; a missing file is skipped and reported
    csv = tmp_path / "t.csv"
    csv.write_text("path,label,note\n" + "".join(f"imgs/{NAMES[i]},{i},n{i}\n" for i in order)
                   + "imgs/missing.png,9,gone\n")
    e = embed(tiny_vit, csv, batch_size=2, num_workers=1, image_size=32)
    assert e.paths == [f"imgs/{NAMES[i]}" for i in order]
    assert e.metadata == {"label": order, "note": [f"n{i}" for i in order]}
    assert e.skipped == [("imgs/missing.png", e.skipped[0][1])] and "cannot read" in e.skipped[0][1]
    torch.testing.assert_close(e.features, ref[order], atol=1e-6, rtol=0)
    # parquet with absolute paths
    pq.write_table(pa.table({"path": [str(images / NAMES[i]) for i in order], "w": [0.5, 1.5, 2.5]}),
                   tmp_path / "t.parquet")
    e = embed(tiny_vit, tmp_path / "t.parquet", num_workers=0, image_size=32)
    assert e.metadata == {"w": [0.5, 1.5, 2.5]}
    torch.testing.assert_close(e.features, ref[order], atol=1e-6, rtol=0)
    (tmp_path / "nopath.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(ValueError, match=r"nopath\.csv: no 'path' column \(columns: file, label\)"):
        open_source(tmp_path / "nopath.csv")
    (tmp_path / "x.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"x\.bin: unknown input type"):
        open_source(tmp_path / "x.bin")


def test_webdataset_tars_single_glob_and_brace(tmp_path: Path, images: Path, tiny_vit: torch.nn.Module) -> None:
    ref = _ref(tiny_vit, images)
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_tar(shards / "000.tar", images, NAMES[:3], extra={"s/textonly.txt": b"no image in this sample"})
    _write_tar(shards / "001.tar", images, NAMES[3:])
    one = open_source(shards / "000.tar")
    assert one.kind == "webdataset" and len(one) == 3  # the text-only sample has no image: not an item
    assert one.keys == [f"{shards}/000.tar/s/img0{i}.png" for i in range(3)]
    assert one.metadata == {"txt": [f"caption of {n}" for n in NAMES[:3]], "cls": ["0", "1", "2"]}
    for pattern in (str(shards / "*.tar"), str(shards / "{000..001}.tar")):
        e = embed(tiny_vit, pattern, batch_size=4, num_workers=1, image_size=32)
        assert [p.rsplit("/", 1)[1] for p in e.paths] == NAMES
        assert e.metadata["cls"] == ["0", "1", "2", "0", "1", "2"]
        torch.testing.assert_close(e.features, ref, atol=1e-6, rtol=0)


def test_tar_bad_members_and_damaged_tars_are_reported(tmp_path: Path, images: Path,
                                                       tiny_vit: torch.nn.Module) -> None:
    ref = _ref(tiny_vit, images)
    words = write_bad_files(tmp_path / "bad")
    _write_tar(tmp_path / "a.tar", images, NAMES[:2],
               extra={f"b/{n}": (tmp_path / "bad" / n).read_bytes() for n in words})
    _write_tar(tmp_path / "b.tar", images, NAMES[2:])
    with tarfile.open(tmp_path / "b.tar") as tf:
        second = tf.getmember(f"s/{Path(NAMES[3]).stem}.png")
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[:second.offset_data + second.size // 2])  # cut inside an image
    e = embed(tiny_vit, str(tmp_path / "{a,b,c}.tar"), batch_size=3, num_workers=0, image_size=32)
    reasons = dict(e.skipped)
    assert reasons[str(tmp_path / "c.tar")] == "no such tar file"
    assert "damaged tar" in reasons[str(tmp_path / "b.tar")]
    assert "truncated tar member" in reasons[f"{tmp_path}/b.tar/s/img03.png"]
    for name, word in words.items():
        assert word in reasons[f"{tmp_path}/a.tar/b/{name}"]
    # the good images of a.tar and the first sample of the damaged b.tar are embedded, nothing else
    assert [p.rsplit("/", 1)[1] for p in e.paths] == NAMES[:3]
    torch.testing.assert_close(e.features, ref[:3], atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29 points to TorchCodec
def test_device_decode_matches_pillow_path(tmp_path: Path, images: Path, tiny_vit: torch.nn.Module) -> None:
    """decode="device" (workers read bytes, torchvision decodes and resizes on the model's device: the GPU
    path, run here on the CPU) gives the Pillow path's rows, skips and nearly its features."""
    rng = np.random.default_rng(3)
    for i in range(3):  # JPEGs (the nvJPEG path on CUDA), one with an EXIF rotation, a CMYK TIFF, a 16-bit PNG
        Image.fromarray(rng.integers(0, 256, (40, 28, 3), dtype=np.uint8)).save(images / f"j{i}.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(images / "j0.jpg").save(images / "j0_rot.jpg", quality=95, exif=exif.tobytes())
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).convert("CMYK").save(images / "k.tiff")
    Image.fromarray(rng.integers(0, 65536, (20, 26), dtype=np.uint16)).save(images / "i16.png")  # 16-bit gray
    words = write_bad_files(images / "bad")
    ref = embed(tiny_vit, images, batch_size=4, num_workers=0, image_size=32)
    dev = embed(tiny_vit, images, batch_size=4, num_workers=1, image_size=32, decode="device")
    assert dev.paths == ref.paths and len(ref.paths) == len(NAMES) + 6
    assert dict(dev.skipped).keys() == dict(ref.skipped).keys() == {f"bad/{n}" for n in words}
    for name, word in words.items():
        assert word in dict(dev.skipped)[f"bad/{name}"]
    # tensor resize vs Pillow resize: the same image up to interpolation rounding
    cos = torch.nn.functional.cosine_similarity(dev.features, ref.features)
    assert cos.min() > 0.99, cos
    rot = dev.paths.index("j0_rot.jpg")
    assert (dev.features[rot] - dev.features[dev.paths.index("j0.jpg")]).abs().max() > 1e-3  # EXIF applied
    with pytest.raises(ValueError, match="decode='gpu'"):
        embed(tiny_vit, images, decode="gpu")
