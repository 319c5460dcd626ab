"""`dinokit index ...` and `dinokit attention` end to end on a tiny saved model and a few images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

import dinokit
from dinokit.cli import app
from dinokit.models.backbone import create_backbone

runner = CliRunner()


def _saved_vit(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
    dinokit.save(model, folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    photos = base / "photos"
    for i in range(16):
        d = photos / ("x" if i < 8 else "y")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
    more = base / "more"
    more.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(more / f"m{i}.png")
    return {"base": base, "photos": photos, "more": more, "model": _saved_vit(base / "model", 0),
            "other": _saved_vit(base / "other", 1)}


def run(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr with rich's line wrapping undone)."""
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, " ".join(res.stderr.split())


def test_index_build_add_search_info_remove(setup: dict[str, Path]) -> None:
    idx = setup["base"] / "photos.index"
    code, _, err = run("index", "build", setup["photos"], "--model", setup["model"], "--out", idx,
                       "--kind", "hnsw", "--knob", "ef_search=48", "--workers", "0")
    assert code == 0, err
    assert "index.db" in {p.name for p in idx.iterdir()}
    code, out, _ = run("index", "info", idx, "--json")
    meta = json.loads(out)
    assert meta["kind"] == "hnsw" and meta["count"] == 16 and meta["knobs"]["ef_search"] == 48
    assert meta["model"]["source"] == str(setup["model"].resolve())

    # the model recorded in the index is loaded when --model is not given
    q = setup["photos"] / "y" / "09.png"
    sheet = setup["base"] / "sheet.png"
    code, out, err = run("index", "search", idx, q, setup["photos"] / "x" / "01.png", "-k", "3", "--json",
                         "--sheet", sheet)
    assert code == 0, err
    rows = json.loads(out)
    assert [r["query"] for r in rows] == [str(q), str(setup["photos"] / "x" / "01.png")]
    assert rows[0]["results"][0]["path"] == "y/09.png" and rows[0]["results"][0]["score"] == pytest.approx(1, abs=1e-5)
    assert len(rows[1]["results"]) == 3 and rows[1]["results"][0]["path"] == "x/01.png"
    with Image.open(sheet) as im:
        # a row per query, the query and 3 results per row
        assert im.size[0] > 4 * 128 and 2 * 128 < im.size[1] < 3 * 200

    code, _, err = run("index", "add", idx, setup["more"], setup["photos"], "--workers", "0")
    assert code == 0, err
    assert "added 4 images (16 skipped); the index holds 20" in err
    code, out, _ = run("index", "info", idx, "--json")
    info = json.loads(out)
    assert info["count"] == 20 and info["kind"] == "hnsw" and info["feature"] == "cls"

    code, _, err = run("index", "remove", idx, "x/01.png", "nope.png")
    assert code == 0 and "removed 1 of 2 items" in err
    code, out, _ = run("index", "search", idx, setup["photos"] / "x" / "01.png", "-k", "20", "--json")
    assert "x/01.png" not in {r["path"] for r in json.loads(out)[0]["results"]}

    code, out, _ = run("index", "info", idx)
    assert code == 0 and "hnsw" in out


def test_index_metadata_filter_remove_by_id_compact(setup: dict[str, Path], tmp_path: Path) -> None:
    meta = tmp_path / "shops.csv"
    meta.write_text("path,shop\n" + "".join(f"{d}/{i:02d}.png,{'north' if d == 'x' else 'south'}\n"
                                            for i in range(16) for d in ("x", "y") if (d == "x") == (i < 8)))
    idx = tmp_path / "shops.index"
    code, _, err = run("index", "build", setup["photos"], "--model", setup["model"], "--out", idx,
                       "--metadata", meta, "--workers", "0")
    assert code == 0, err
    q = setup["photos"] / "x" / "01.png"
    code, out, err = run("index", "search", idx, q, "-k", "20", "--filter", '{"shop": "south"}', "--json")
    assert code == 0, err
    results = json.loads(out)[0]["results"]
    assert len(results) == 8 and all(r["path"].startswith("y/") and r["metadata"] == {"shop": "south"}
                                     for r in results)
    code, _, err = run("index", "search", idx, q, "--filter", "{not json")
    assert code == 1 and "--filter" in err and "not JSON" in err
    code, out, _ = run("index", "search", idx, q, "-k", "1", "--json")
    top = json.loads(out)[0]["results"][0]
    assert top["path"] == "x/01.png"
    code, _, err = run("index", "remove", idx, str(top["id"]))
    assert code == 0 and "removed 1 of 1 items; the index holds 15" in err
    code, _, err = run("index", "add", idx, setup["more"], "--metadata", meta, "--workers", "0")
    assert code == 0 and "added 4 images (0 skipped); the index holds 19" in err
    code, _, err = run("index", "compact", idx)
    assert code == 0 and "compacted: 19 items in one flat index" in err
    code, out, _ = run("index", "info", idx, "--json")
    info = json.loads(out)
    assert info["count"] == info["ntotal"] == 19 and info["small_segments"] == 0
    assert str(setup["more"].resolve()) in info["roots"]


def test_index_search_errors(setup: dict[str, Path], tmp_path: Path) -> None:
    idx = tmp_path / "i"
    code, _, err = run("index", "build", setup["photos"] / "x", "--model", setup["model"], "--out", idx,
                       "--workers", "0")
    assert code == 0, err
    code, _, err = run("index", "search", idx, setup["photos"] / "x" / "01.png", "--model", setup["other"])
    assert code == 1 and "error: model mismatch" in err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code, _, err = run("index", "search", idx, setup["photos"] / "x" / "02.png", bad)
    assert code == 1 and err.startswith(f"error: {bad}: ") and "corrupt" in err
    code, _, err = run("index", "build", setup["photos"] / "x", "--model", setup["model"],
                       "--out", setup["photos"] / "x")
    assert code == 1 and "exists and is not a dinokit index folder" in err
    assert len(list((setup["photos"] / "x").iterdir())) == 8  # nothing was deleted
    code, _, err = run("index", "info", tmp_path / "missing")
    assert code == 1 and "no such index folder" in err


def test_attention_cli_writes_the_files(setup: dict[str, Path], tmp_path: Path) -> None:
    frames = tmp_path / "clip"
    frames.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(frames / f"f{i}.png")
    out_dir = tmp_path / "attn"
    code, _, err = run("attention", setup["photos"] / "x" / "01.png", frames, "--model", setup["model"],
                       "--out", out_dir, "--image-size", "40", "--threshold", "0.5", "--video-gif")
    assert code == 0, err
    files = sorted(p.name for p in (out_dir / "01").iterdir())
    assert files == sorted(["img.png", "attn-mean.png", "overlay.png",
                            *[f"attn-head{j}.png" for j in range(3)],
                            *[f"mask_th0.5_head{j}.png" for j in range(3)],
                            *[f"overlay-head{j}.png" for j in range(3)]])
    with Image.open(out_dir / "01" / "attn-head0.png") as im:
        assert im.size == (48, 40)  # 44x36 resized to short side 40 -> 48x40 (already multiples of 8)
    with Image.open(out_dir / "clip.gif") as im:
        assert im.n_frames == 3


def test_attention_cli_rejects_a_resnet(tmp_path: Path) -> None:
    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    dinokit.save(resnet, tmp_path / "resnet")
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(img)
    code, _, err = run("attention", img, "--model", tmp_path / "resnet", "--out", tmp_path / "o")
    assert code == 1 and "no transformer blocks with self-attention" in err


def test_index_build_reports_skipped_files_and_stays_inside_the_folder(setup: dict[str, Path], tmp_path: Path) -> None:
    """Broken files are named once; a link loop adds nothing; a link outside the folder is followed
    only with --follow-links."""
    import shutil

    photos = tmp_path / "photos"
    shutil.copytree(setup["photos"] / "x", photos)
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (photos / "loop").symlink_to(photos)  # sub/loop -> .. : would index every image again and again
    (photos / "outside").symlink_to(setup["more"])
    idx = tmp_path / "a.index"
    code, _, err = run("index", "build", photos, "--model", setup["model"], "--out", idx, "--workers", "0")
    assert code == 0, err
    assert dinokit.Index.load(idx).count == 8  # the 8 images once; not the loop, not the outside link
    assert err.count("broken.png") == 1 and "outside" in err
    code, _, err = run("index", "build", photos, "--model", setup["model"], "--out", idx, "--workers", "0",
                       "--follow-links")
    assert code == 0, err
    assert dinokit.Index.load(idx).count == 12  # + the 4 images behind the outside link
