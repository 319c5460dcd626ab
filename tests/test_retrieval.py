"""dinokit.Index: exact search against numpy, approximate recall floors, persistence, add/remove, errors."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.data.images import ImageError
from dinokit.retrieval.index import Index, ModelMismatchError
from dinokit.retrieval.kinds import choose_kind

# tiny indexes: OpenMP threads only add spin-waiting on the shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_faiss_thread")




def clustered(n: int, d: int = 32, sub: int = 8, n_clusters: int = 100, seed: int = 0) -> np.ndarray:
    """Unit vectors shaped like embeddings: clusters in a low-dim subspace, rotated into d dims, plus noise."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, sub))
    basis = np.linalg.qr(rng.standard_normal((d, sub)))[0]
    labels = rng.integers(0, n_clusters, n)
    x = (centers[labels] + rng.standard_normal((n, sub))) @ basis.T + 0.5 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def names(n: int, prefix: str = "img") -> list[str]:
    return [f"{prefix}/{i:05d}.png" for i in range(n)]


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = qn.astype(np.float64) @ xn.T.astype(np.float64)
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(sims, ids, axis=1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    x = clustered(5200)
    return {"x": x[:5000], "q": x[5000:]}


def test_exact_search_equals_numpy_brute_force() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((700, 24)).astype(np.float32) * rng.uniform(0.5, 3, (700, 1)).astype(np.float32)
    q = rng.standard_normal((30, 24)).astype(np.float32)
    index = Index.from_features(x, names(700), kind="flat")
    res = index.search(q, k=10)
    ids, sims = brute_force(x, q, 10)
    assert res.paths.shape == res.scores.shape == res.ids.shape == (30, 10)
    np.testing.assert_array_equal(res.ids, ids)
    np.testing.assert_allclose(res.scores, sims, rtol=0, atol=1e-5)
    assert res.paths[0, 0] == names(700)[ids[0, 0]]
    # torch vectors and a single (D,) vector are accepted too
    one = index.search(torch.from_numpy(q[0]), k=3)
    np.testing.assert_array_equal(one.ids[0], ids[0, :3])


def test_k_larger_than_the_index() -> None:
    index = Index.from_features(np.eye(4, dtype=np.float32), ["a", "b", "c", "d"], kind="flat")
    res = index.search(np.eye(4, dtype=np.float32)[:1], k=10)
    assert res.paths.shape == (1, 4) and res.paths[0, 0] == "a"


@pytest.mark.parametrize(("kind", "knobs", "floor"), [
    ("hnsw", {}, 0.98),
    ("hnsw", {"M": 16, "ef_search": 32}, 0.95),
    ("ivfpq", {}, 0.95),
])
def test_approximate_recall_floor(data, kind: str, knobs: dict, floor: float) -> None:
    x, q = data["x"], data["q"]
    truth, _ = brute_force(x, q, 10)
    index = Index.from_features(x, names(len(x)), kind=kind, **knobs)
    assert index.kind == kind
    r = recall(index.search(q, k=10).ids, truth)
    assert r >= floor, f"{kind} {knobs}: recall@10 {r:.3f} < {floor}"
    if kind == "ivfpq":
        # the knobs are wired: one probed list and no re-rank slack finds far fewer neighbours
        low = recall(index.search(q, k=10, nprobe=1, k_factor=1).ids, truth)
        assert low < r - 0.2
        # a re-ranked score is the exact cosine similarity of the returned vector
        res = index.search(q[:5], k=3)
        exact = (q[:5, None, :] * x[res.ids]).sum(-1)
        np.testing.assert_allclose(res.scores, exact, rtol=0, atol=1e-5)


def test_auto_choice_rule() -> None:
    assert choose_kind(1_000, 384)[0] == "flat"
    assert choose_kind(200_000, 384)[0] == "hnsw"
    assert choose_kind(1_000_000, 384) == ("ivfpq", {"refine": "flat"})
    assert choose_kind(200_000, 384, memory_budget=2**28) == ("ivfpq", {"refine": "sq8"})
    assert choose_kind(10_000_000, 384) == ("ivfpq", {"refine": "sq8"})
    # past the 8-bit copy: re-ranked from the vector file, then the inverted lists themselves on disk
    assert choose_kind(50_000_000, 384) == ("ivfpq", {"refine": "disk"})
    assert choose_kind(10_000_000, 384, memory_budget=4 * 2**30) == ("ivfpq", {"refine": "disk"})
    assert choose_kind(200_000_000, 384) == ("ivfpq", {"refine": "disk", "ondisk": 1})
    assert choose_kind(2_000_000, 384, memory_budget=3 * 2**30) == ("ivfpq", {"refine": "flat"})
    assert Index.from_features(clustered(300), names(300), kind="auto").kind == "flat"


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_save_load_round_trip(tmp_path: Path, data, kind: str) -> None:
    x, q = data["x"], data["q"]
    ident = {"name": "m", "fingerprint": "abc123", "input_size": [3, 32, 32]}
    index = Index.from_features(x, names(len(x)), kind=kind, model_info=ident, feature="cls")
    before = index.search(q, k=5)
    index.save(tmp_path / "idx")
    index.save(tmp_path / "idx")  # overwriting an existing index folder works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp folders left behind
    loaded = Index.load(tmp_path / "idx")
    meta = loaded.info()
    assert meta["format_version"] == 2 and meta["kind"] == kind and meta["model"] == ident
    assert meta["feature"] == "cls" and meta["dim"] == 32 and meta["count"] == len(x)
    after = loaded.search(q, k=5)
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_array_equal(before.paths, after.paths)
    np.testing.assert_allclose(before.scores, after.scores, rtol=0, atol=1e-6)
    assert loaded.knobs == index.knobs and loaded.model_identity == ident


def test_save_never_replaces_a_non_index_folder(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.png").write_bytes(b"x")
    index = Index.from_features(clustered(20), names(20), kind="flat")
    with pytest.raises(FileExistsError, match="photos: exists and is not a dinokit index folder"):
        index.save(photos)
    assert (photos / "cat.png").read_bytes() == b"x"
    (tmp_path / "empty").mkdir()
    index.save(tmp_path / "empty")  # an empty folder is fine
    assert len(Index.load(tmp_path / "empty")) == 20


def test_load_rejects_newer_format(tmp_path: Path) -> None:
    Index.from_features(clustered(50), names(50), kind="flat").save(tmp_path / "idx")
    with sqlite3.connect(tmp_path / "idx" / "index.db") as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'format_version'")
    with pytest.raises(ValueError, match=r"index\.db: index format version 99 is not supported"):
        Index.load(tmp_path / "idx")
    with pytest.raises(FileNotFoundError, match="no such index folder"):
        Index.load(tmp_path / "nope")


def test_add_skips_paths_already_present(data) -> None:
    x = data["x"][:300]
    index = Index.from_features(x[:200], names(200), kind="flat")
    added = index.add(features=x[100:300], paths=names(300)[100:300])
    assert added.ids == list(range(200, 300)) and len(index) == 300 and index.ntotal == 300
    assert added.skipped == [(p, "already in the index") for p in names(200)[100:]]
    assert index.paths == names(300)
    assert len(index.add(features=x[:10], paths=names(10)).ids) == 0
    res = index.search(x[250:251], k=1)
    assert res.paths[0, 0] == names(300)[250]
    np.testing.assert_allclose(index.vectors([names(300)[250]]), x[250:251], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_remove(data, kind: str) -> None:
    x, q = data["x"], data["q"]
    index = Index.from_features(x, names(len(x)), kind=kind)
    first = index.search(q, k=10)
    gone = sorted({p for row in first.paths[:, :3] for p in row})
    assert index.remove([index.id_of(p) for p in gone]) == len(gone)
    assert index.remove([10**9, int(first.ids[0, 0])]) == 0  # unknown, already removed
    res = index.search(q, k=10)
    assert not set(res.paths.ravel()) & set(gone)
    assert len(index) == len(x) - len(gone)
    # remove a third: the index is compacted and still answers like brute force on what is left
    third = names(len(x))[::3]
    index.remove(range(0, len(x), 3))
    assert index.ntotal == len(index)  # compacted
    dropped = set(third) | set(gone)
    keep = [i for i, p in enumerate(names(len(x))) if p not in dropped]
    truth, _ = brute_force(x[keep], q, 10)
    truth_paths = np.array(names(len(x)), dtype=object)[keep][truth]
    got = index.search(q, k=10).paths
    r = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth_paths, strict=True)])
    assert r >= (1.0 if kind == "flat" else 0.93)
    all_names = names(len(x))
    assert index.paths == [all_names[i] for i in keep]


def test_search_knob_validation(data) -> None:
    index = Index.from_features(data["x"][:500], names(500), kind="hnsw")
    index.set_knobs(ef_search=128)
    assert index.knobs["ef_search"] == 128
    with pytest.raises(ValueError, match="nprobe: not a search knob of a hnsw index"):
        index.set_knobs(nprobe=3)
    with pytest.raises(ValueError, match="unknown knob"):
        Index.from_features(data["x"][:500], names(500), kind="flat", nprobe=3)


def test_feature_kind_mismatch(data) -> None:
    index = Index.from_features(data["x"][:100], names(100), kind="flat", feature="cls")
    with pytest.raises(ModelMismatchError, match="'cls\\+avgpool' features but the index holds 'cls'"):
        index.search(data["q"][:2], k=3, feature_kind="cls+avgpool")
    with pytest.raises(ModelMismatchError, match="dimension 16"):
        index.search(np.ones((1, 16), np.float32), k=3)


# ---------------------------------------------------------------- with a model and image files


def tiny_backbone(seed: int) -> torch.nn.Module:
    from dinokit.models.backbone import create_backbone

    torch.manual_seed(seed)
    return create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(24):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(sub / f"{i:02d}.png")
    return root


def test_build_search_by_path_and_image(photo_folder: Path) -> None:
    model = tiny_backbone(0)
    index = Index.build(photo_folder, model=model, kind="flat", num_workers=0)
    assert len(index) == 24 and index.paths[0] == "a/01.png"
    assert index.model_identity["fingerprint"] == dinokit.models.backbone.fingerprint(model)
    res = index.search([photo_folder / "b" / "04.png"], k=3)  # build() keeps its model for queries
    assert res.paths[0, 0] == "b/04.png" and res.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    with Image.open(photo_folder / "a" / "07.png") as im:
        res = index.search(im.convert("RGB"), k=1, model=model)
    assert res.paths[0, 0] == "a/07.png"
    assert index.resolve("a/07.png") == photo_folder.resolve() / "a" / "07.png"
    # features from dinokit.embed of the same model give the same neighbours
    emb = dinokit.embed(model, photo_folder, num_workers=0)
    np.testing.assert_array_equal(index.search(emb, k=2).ids[:, 0], np.arange(24))


def test_add_folder_without_duplicates(tmp_path: Path, photo_folder: Path) -> None:
    import shutil

    model = tiny_backbone(0)
    root = tmp_path / "col"
    shutil.copytree(photo_folder / "a", root / "a")
    index = Index.build(root, model=model, kind="hnsw", num_workers=0)
    assert len(index) == 12
    shutil.copytree(photo_folder / "b", root / "b")
    assert len(index.add(root, model=model, num_workers=0).ids) == 12  # only the new folder's images
    assert len(index.add(root, model=model, num_workers=0).ids) == 0
    assert len(index) == 24 and len(set(index.paths)) == 24 and "b/04.png" in index
    index.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")
    res = loaded.search([root / "b" / "10.png"], k=1, model=model)
    assert res.paths[0, 0] == "b/10.png"


def test_model_mismatch_is_a_clear_error(tmp_path: Path, photo_folder: Path) -> None:
    index = Index.build(photo_folder, model=tiny_backbone(0), kind="flat", num_workers=0)
    other = tiny_backbone(1)
    with pytest.raises(ModelMismatchError, match=r"model mismatch: the index was built with .* \(fingerprint"):
        index.search([photo_folder / "a" / "01.png"], k=3, model=other)
    with pytest.raises(ModelMismatchError, match="model mismatch"):
        index.add(photo_folder, model=other)
    with pytest.raises(ModelMismatchError, match="query features come from"):
        index.search(dinokit.embed(other, photo_folder / "a", num_workers=0), k=3)
    index.save(tmp_path / "idx")
    with pytest.raises(ValueError, match="needs model="):
        Index.load(tmp_path / "idx").search([photo_folder / "a" / "01.png"], k=3)


def test_loaded_index_searches_with_its_recorded_model(tmp_path: Path, photo_folder: Path) -> None:
    dinokit.save(tiny_backbone(0), tmp_path / "model")
    model = dinokit.load(tmp_path / "model")
    Index.build(photo_folder, model=model, kind="flat", num_workers=0).save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")
    assert loaded.model_info["source"] == str((tmp_path / "model").resolve())
    res = loaded.search([photo_folder / "b" / "04.png"], k=1)  # no model=: the recorded source is loaded
    assert res.paths[0, 0] == "b/04.png"
    added = loaded.add([photo_folder / "a" / "01.png"], num_workers=0)
    assert added.ids == [] and added.skipped == [(str(photo_folder / "a" / "01.png"), "already in the index")]


def test_metadata_list_stays_aligned_when_images_are_skipped(tmp_path: Path, photo_folder: Path) -> None:
    import shutil

    model = tiny_backbone(0)
    shutil.copytree(photo_folder / "a", tmp_path / "a")
    index = Index.build([tmp_path / "a" / "01.png", tmp_path / "a" / "03.png"], model=model, kind="flat",
                        num_workers=0, metadata=[{"n": 1}, {"n": 3}])
    assert [index.get(i) for i in range(2)] == [{"id": 0, "path": "01.png", "metadata": {"n": 1}},
                                                {"id": 1, "path": "03.png", "metadata": {"n": 3}}]
    broken = tmp_path / "a" / "broken.png"
    broken.write_bytes(b"not an image")
    items = [tmp_path / "a" / "01.png", broken, tmp_path / "a" / "05.png", tmp_path / "a" / "07.png"]
    res = index.add(items, metadata=[{"n": 1}, {"n": -1}, {"n": 5}, {"n": 7}], num_workers=0)
    assert [index.get(i)["metadata"] for i in res.ids] == [{"n": 5}, {"n": 7}]
    assert [index.get(i)["path"] for i in res.ids] == ["05.png", "07.png"]
    assert {name for name, _ in res.skipped} == {str(items[0]), str(broken)}
    with pytest.raises(ValueError, match="metadata has 1 entries for 2 images"):
        index.add(items[2:], metadata=[{}], num_workers=0)


def test_corrupt_query_image_named_in_one_line(tmp_path: Path, photo_folder: Path) -> None:
    model = tiny_backbone(0)
    index = Index.build(photo_folder, model=model, kind="flat", num_workers=0)
    bad = tmp_path / "broken.png"
    good = (photo_folder / "a" / "01.png").read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageError) as err:
        index.search([photo_folder / "a" / "01.png", bad], k=3, model=model)
    msg = str(err.value)
    assert msg.startswith(f"{bad}: ") and "\n" not in msg
