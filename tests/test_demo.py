"""`make demo` end to end on a tiny subset (`recipes/demo.py --quick`): every step runs and its outputs hold sane numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, str(ROOT / "recipes" / "demo.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())

    knn = summary["knn"]["results"]
    assert set(knn) == {"10", "20"} and summary["knn"]["num_val"] == 30
    for r in knn.values():  # 10 classes: chance is 10%; the shipped model is far above it
        assert 30.0 <= r["top1"] <= 100.0 and r["top1"] <= r["top5"] <= 100.0
    assert 20.0 <= summary["linear"]["top1"] <= 100.0
    assert summary["timm_reload_max_abs_diff"] < 1e-4

    hits = json.loads((out / "search.json").read_text())
    assert len(hits) == 4
    for h in hits:  # each query is a val image; its neighbours are train images, best first
        scores = [r["score"] for r in h["results"]]
        assert len(scores) == 8 and scores == sorted(scores, reverse=True) and -1.0 <= scores[-1] <= scores[0] <= 1.0

    for png in ("search.png", "knn.confusion.png", "knn.per_class.png", "linear/confusion.png", "run/curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    attn = sorted(p for p in (out / "attention").iterdir() if p.is_dir())
    assert len(attn) == 3 and all((d / "overlay.png").is_file() and (d / "attn-mean.png").is_file() for d in attn)

    # the exported ViT reloads in plain timm with the same features
    model = timm.create_model(f"local-dir:{out / 'exported'}", pretrained=True).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 192)
