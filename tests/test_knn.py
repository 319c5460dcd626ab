"""Weighted k-NN: the official vote against hand computations, and every search path against a reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dinokit
from dinokit.eval.knn import knn_classify, knn_classify_multi, knn_scores, knn_search


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def reference_vote(train: np.ndarray, ytr: np.ndarray, test: np.ndarray, k: int, T: float, C: int) -> np.ndarray:
    """Plain float64 official vote: class scores (Q, C). Neighbour ties broken by train index."""
    tr = train / np.linalg.norm(train, axis=1, keepdims=True)
    te = test / np.linalg.norm(test, axis=1, keepdims=True)
    scores = np.zeros((len(te), C))
    for q, x in enumerate(te):
        sims = tr.astype(np.float64) @ x.astype(np.float64)
        order = np.lexsort((np.arange(len(sims)), -sims))[:k]
        for j in order:
            scores[q, ytr[j]] += math.exp(sims[j] / T)
    return scores


def test_public_name() -> None:
    assert dinokit.knn_classify is knn_classify


def test_weights_are_exp_sim_over_T() -> None:
    # One class-0 neighbour at sim 1.0, two class-1 neighbours at sim 0.96.
    # T=0.07: 2 e^{0.96/0.07} > e^{1/0.07} (ratio 2 e^{-0.571} = 1.13) -> class 1.
    # T=0.02: 2 e^{-2} = 0.27 -> class 0. Majority or sim-weighted votes pick class 1 for both.
    c = 0.96
    train = np.array([[1, 0], [c, math.sqrt(1 - c * c)], [c, -math.sqrt(1 - c * c)], [-1, 0]], dtype=np.float32)
    ytr = np.array([0, 1, 1, 0])
    test = np.array([[3.0, 0.0]], dtype=np.float32)  # norm 3: the vote must normalize
    assert knn_classify(train, ytr, test, [1], k=3, T=0.07)["top1"] == 100.0
    assert knn_classify(train, ytr, test, [0], k=3, T=0.02)["top1"] == 100.0
    assert knn_classify(train, ytr, test, [0], k=1, T=0.07)["top1"] == 100.0
    scores = knn_scores(train, ytr, test, k=3, T=0.07)
    expected = [math.exp(1 / 0.07), 2 * math.exp(0.96 / 0.07)]
    np.testing.assert_allclose(scores[0].numpy(), expected, rtol=1e-4)


def test_k_larger_than_a_class_and_than_the_train_set() -> None:
    # Class 0: two points near the test point; class 1: five points farther away.
    angles0, angles1 = [10, 20], [40, 45, 50, 55, 60]
    train = np.array([_unit(a) for a in angles0 + angles1], dtype=np.float32)
    ytr = np.array([0, 0, 1, 1, 1, 1, 1])
    test = np.array([_unit(0)], dtype=np.float32)
    T = 0.1
    s0 = sum(math.exp(math.cos(math.radians(a)) / T) for a in angles0)
    for k in (2, 3, 5, 7):
        s1 = sum(math.exp(math.cos(math.radians(a)) / T) for a in angles1[: k - 2])
        got = knn_scores(train, ytr, test, k=k, T=T)[0].numpy()
        np.testing.assert_allclose(got, [s0, s1], rtol=1e-4)
    # k=5: s0 = e^{9.848}+e^{9.397} = 31,000 vs s1 = e^{7.66}+e^{7.07}+e^{6.43} = 3,900 -> class 0.
    # k=7 (all): class 1 adds e^{5.74}+e^{5.0} but still loses.
    res = knn_classify_multi(train, ytr, test, [0], ks=(5, 7, 50), T=T)
    assert [res[k]["top1"] for k in (5, 7, 50)] == [100.0, 100.0, 100.0]


def test_ties_rank_smaller_class_and_smaller_index_first() -> None:
    # The test point is exactly between train 0 (class 1) and train 1 (class 0).
    train = np.array([[1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    ytr = np.array([1, 0, 2])
    test = np.array([[1, 1]], dtype=np.float32)
    # k=2: equal class scores -> class 0 (smaller class index) ranks first.
    assert knn_classify(train, ytr, test, [0], k=2)["top1"] == 100.0
    assert knn_classify(train, ytr, test, [1], k=2)["top1"] == 0.0
    # k=1: the two neighbours tie; the smaller train index (class 1) is the neighbour.
    assert knn_classify(train, ytr, test, [1], k=1)["top1"] == 100.0
    sims, idx = knn_search(train, test, 2)
    assert idx.tolist() == [[0, 1]]
    np.testing.assert_allclose(sims.numpy(), [[math.sqrt(0.5)] * 2], rtol=1e-6)


def test_two_classes_top5_is_all_classes() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(30, 8)).astype(np.float32)
    ytr = np.arange(30) % 2
    test = rng.normal(size=(7, 8)).astype(np.float32)  # fewer than 100 test images
    yte = np.array([0, 1, 1, 0, 1, 0, 0])
    res = knn_classify_multi(train, ytr, test, yte, ks=(1, 5, 20), T=0.07)
    for k in (1, 5, 20):
        assert res[k]["top5"] == 100.0  # top-min(5, C): both classes
        pred = reference_vote(train, ytr, test, k, 0.07, 2).argmax(1)
        assert res[k]["top1"] == pytest.approx(100.0 * np.mean(pred == yte))
        conf = np.array(res[k]["confusion"])
        assert conf.sum() == 7 and np.trace(conf) == int(np.sum(pred == yte))


def test_per_class_accuracy_and_absent_class() -> None:
    train = np.array([_unit(0), _unit(90), _unit(180)], dtype=np.float32)
    ytr = np.array([0, 1, 2])
    test = np.array([_unit(5), _unit(85), _unit(100), _unit(-5)], dtype=np.float32)
    yte = np.array([0, 1, 0, 0])  # the third is misclassified as 1
    res = knn_classify_multi(train, ytr, test, yte, ks=(1,), num_classes=5)[1]
    assert res["top1"] == 75.0
    assert res["per_class"] == [pytest.approx(200 / 3), 100.0, None, None, None]
    assert res["confusion"][0] == [2, 1, 0, 0, 0]


def test_one_test_image_and_clamped_k() -> None:
    train = np.eye(4, dtype=np.float32)
    ytr = np.array([0, 1, 2, 3])
    res = knn_classify_multi(train, ytr, np.array([[0.1, 0.9, 0, 0]], dtype=np.float32), [1], ks=(1, 10))
    assert res[1]["top1"] == 100.0 and res[10]["top1"] == 100.0 and res[10]["top5"] == 100.0


def test_bad_inputs_name_the_problem() -> None:
    x = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="train_labels"):
        knn_classify(x, [0, 1], x, [0, 1, 2])
    with pytest.raises(ValueError, match="feature sizes differ"):
        knn_classify(x, [0, 1, 2], np.ones((3, 5)), [0, 1, 2])
    with pytest.raises(ValueError, match=">= 0"):
        knn_classify(x, [0, -1, 2], x, [0, 1, 2])


@pytest.fixture(scope="module")
def clustered() -> dict[str, np.ndarray]:
    """Gaussian clusters: 4000 train / 300 test, 64-d, 7 classes (dense neighbourhoods, no exact ties)."""
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(7, 64))
    ytr, yte = rng.integers(0, 7, 4000), rng.integers(0, 7, 300)
    xtr = centers[ytr] + 1.5 * rng.normal(size=(4000, 64))
    xte = centers[yte] + 1.5 * rng.normal(size=(300, 64))
    return {"xtr": xtr.astype(np.float32), "ytr": ytr, "xte": xte.astype(np.float32), "yte": yte}


def test_all_search_paths_agree_with_the_reference(clustered: dict[str, np.ndarray]) -> None:
    d = clustered
    tr = d["xtr"] / np.linalg.norm(d["xtr"], axis=1, keepdims=True)
    te = d["xte"] / np.linalg.norm(d["xte"], axis=1, keepdims=True)
    full = te.astype(np.float64) @ tr.T.astype(np.float64)
    ref_idx = np.argsort(-full, axis=1, kind="stable")[:, :50]
    ref_sims = np.take_along_axis(full, ref_idx, 1)
    paths = {
        "fp32 one chunk": dict(precision="fp32"),
        "fp32 chunked": dict(precision="fp32", chunk_size=70, train_chunk_size=1333),
        "bf16 re-rank": dict(precision="bf16"),
        "bf16 re-rank chunked": dict(precision="bf16", chunk_size=64, train_chunk_size=1500),
        "bf16 small margin (fp32 fallback)": dict(precision="bf16", margin=1),
        "faiss": dict(backend="faiss", chunk_size=100, train_chunk_size=1000),
    }
    for name, kw in paths.items():
        sims, idx = knn_search(d["xtr"], d["xte"], 50, **kw)
        assert idx.shape == (300, 50), name
        np.testing.assert_allclose(sims.numpy(), ref_sims, atol=2e-6, err_msg=name)
        assert (idx.numpy() == ref_idx).mean() > 0.999, name
    ks = (1, 10, 20, 50)
    base = knn_classify_multi(d["xtr"], d["ytr"], d["xte"], d["yte"], ks=ks, precision="fp32")
    for k in ks:
        pred = reference_vote(d["xtr"], d["ytr"], d["xte"], k, 0.07, 7).argmax(1)
        assert base[k]["top1"] == pytest.approx(100 * np.mean(pred == d["yte"]))
    assert base[20]["top1"] > 60  # clusters are separable well above chance (14%)
    for kw in paths.values():
        res = knn_classify_multi(d["xtr"], d["ytr"], d["xte"], d["yte"], ks=ks, **kw)
        for k in ks:
            assert res[k]["top1"] == base[k]["top1"] and res[k]["top5"] == base[k]["top5"]


def test_bf16_certificate_catches_bf16_errors(caplog: pytest.LogCaptureFixture) -> None:
    # Features that differ only below bf16 resolution (~0.004 near 1) but well above fp32's: bf16
    # sees ties everywhere, so the certificate must send rows to the fp32 search.
    rng = np.random.default_rng(2)
    base = rng.normal(size=(1, 32))
    xtr = base + 1e-2 * rng.normal(size=(2000, 32))
    xte = base + 1e-2 * rng.normal(size=(20, 32))
    ref = knn_search(xtr, xte, 10, precision="fp32")
    with caplog.at_level("DEBUG", logger="dinokit.eval.knn"):
        got = knn_search(xtr, xte, 10, precision="bf16", margin=4)
    assert "re-searched in fp32" in caplog.text
    np.testing.assert_allclose(got[0].numpy(), ref[0].numpy(), atol=1e-6)
    assert (got[1] == ref[1]).float().mean() > 0.95


def test_torch_tensors_and_multi_k_match_single_k(clustered: dict[str, np.ndarray]) -> None:
    d = clustered
    multi = knn_classify_multi(torch.from_numpy(d["xtr"]), torch.from_numpy(d["ytr"]),
                               torch.from_numpy(d["xte"]), torch.from_numpy(d["yte"]), ks=(5, 20))
    for k in (5, 20):
        single = knn_classify(d["xtr"], d["ytr"], d["xte"], d["yte"], k=k)
        assert single == {"top1": multi[k]["top1"], "top5": multi[k]["top5"]}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_paths_match_cpu(clustered: dict[str, np.ndarray]) -> None:
    d = clustered
    ref = knn_search(d["xtr"], d["xte"], 30, precision="fp32", device="cpu")
    for prec in ("fp32", "bf16"):
        got = knn_search(d["xtr"], d["xte"], 30, precision=prec, device="cuda", chunk_size=100,
                         train_chunk_size=1500)
        np.testing.assert_allclose(got[0].numpy(), ref[0].numpy(), atol=2e-5, err_msg=prec)
        assert (got[1] == ref[1]).float().mean() > 0.999, prec


@pytest.mark.parametrize("group", [16, 32])
def test_fused_cpu_selection_finds_the_top_values(group: int) -> None:
    from dinokit.eval import _topk_cpu

    if not _topk_cpu.available():
        pytest.skip("numba not installed")
    rng = np.random.default_rng(3)
    q, n, kk = 40, 40 * group, 25
    x = rng.normal(size=(q, n)).astype(np.float32)
    x[1] = -np.abs(x[1]) - 0.5  # every group all-negative: the raw int16 max would pick the smallest
    x[2] = np.round(x[2] * 2) / 2  # massive ties at the threshold
    x[3] = 0.25  # one value everywhere (more ties than the kernel's buffer: torch fallback)
    x[4, ::7] = -0.0
    x[5, -5:] = -np.inf  # padding columns
    x[6] = -np.abs(x[6]) - 1
    x[6, :40:2], x[6, 1:40:2] = 0.0, -0.0  # the top 25 are zeros of both signs
    approx = torch.from_numpy(x).to(torch.bfloat16)
    ok = _topk_cpu.fused_select(approx, kk, group)[2]
    assert ok.tolist() == [i != 3 for i in range(q)]  # only row 3 needs the torch fallback
    vals, cols = _topk_cpu.bf16_candidates(approx, kk, group)
    ref = approx.float().topk(kk, dim=1).values
    assert torch.equal(vals.float().sort(dim=1).values, ref.sort(dim=1).values)
    assert torch.equal(approx.gather(1, cols).float(), vals.float())  # values sit at their columns
    assert all(len(set(r)) == kk for r in cols.tolist())  # no column twice


def test_fused_and_torch_selection_give_the_same_search(clustered: dict[str, np.ndarray],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from dinokit.eval import _topk_cpu

    if not _topk_cpu.available():
        pytest.skip("numba not installed")
    d = clustered
    fused = knn_search(d["xtr"], d["xte"], 40, precision="bf16")
    monkeypatch.setattr(_topk_cpu, "nb", None)  # what a machine without numba runs
    plain = knn_search(d["xtr"], d["xte"], 40, precision="bf16")
    assert torch.equal(fused[0], plain[0]) and torch.equal(fused[1], plain[1])


def test_sort_desc_orders_by_value_then_index() -> None:
    from dinokit.eval.knn import _sort_desc

    vals = torch.tensor([[0.5, -0.0, 0.5, 0.0, -1.0, 2.0, 0.5, -3e-39]])
    idx = torch.tensor([[7, 3, 2, 1, 9, 4, 0, 5]])
    v, i = _sort_desc(vals, idx)
    # equal values (0.5 x3; -0.0 == 0.0) tie on the smaller index; subnormals keep their order
    assert i.tolist() == [[4, 0, 2, 7, 1, 3, 5, 9]]
    assert torch.equal(v, torch.tensor([[2.0, 0.5, 0.5, 0.5, 0.0, 0.0, -3e-39, -1.0]]))
    big = torch.tensor([[1.0, 1.0]]), torch.tensor([[2**40, 5]])  # indices beyond the packed key
    assert _sort_desc(*big)[1].tolist() == [[5, 2**40]]


def test_knn_classify_accepts_a_list_of_k() -> None:
    g = torch.Generator().manual_seed(0)
    xtr, xte = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    ytr, yte = torch.randint(0, 5, (300,), generator=g), torch.randint(0, 5, (50,), generator=g)
    many = knn_classify(xtr, ytr, xte, yte, k=[5, 20], T=0.07)
    assert set(many) == {5, 20}
    for k in (5, 20):  # one search for all k gives each k's own result
        assert many[k] == knn_classify(xtr, ytr, xte, yte, k=k, T=0.07)


@pytest.mark.parametrize("n", [32 * 30, 32 * 30 + 7])  # whole groups, and a ragged tail of 7 columns
def test_fused_fp32_topk_is_exact_with_index_ties(n: int) -> None:
    from dinokit.eval import _topk_cpu
    from dinokit.eval.knn import _exact_topk, _torch_topk

    if not _topk_cpu.available():
        pytest.skip("numba not installed")
    rng = np.random.default_rng(4)
    q, k = 12, 30
    x = rng.normal(size=(q, n)).astype(np.float32)
    x[1] = np.round(x[1] * 2) / 2  # many exact ties at the k-th value: the smaller columns must win
    x[2] = 0.25  # one value everywhere: more ties than the kernel's buffer (torch fallback)
    x[3] = -np.abs(x[3]) - 0.5
    x[3, ::20], x[3, 1::20] = -0.0, 0.0  # the top values are 96 zeros of both signs: equal, index order
    x[4, 5] = np.nan  # NaN row: torch fallback
    x[5, -3:] = 9.0  # the best values sit in the last columns (the ragged tail when n % 32 != 0)
    x[6] = -np.abs(x[6]) - 1  # all negative
    sims = torch.from_numpy(x)
    ok = _topk_cpu.fp32_topk(sims, k, 32)[2]
    assert ok.tolist() == [i not in (2, 4) for i in range(q)]
    v, i = _exact_topk(sims, k)
    for r in range(q):
        if r == 4:
            continue
        order = np.lexsort((np.arange(n), -x[r].astype(np.float64)))[:k]  # value desc, column asc
        assert i[r].tolist() == order.tolist(), r
        assert torch.equal(v[r], torch.from_numpy(x[r, order]) + 0.0), r
    _, ti = _torch_topk(sims[[4]], k)
    assert torch.equal(i[4], ti[0])
    assert i[5, :3].tolist() == [n - 3, n - 2, n - 1]
