"""The web page of `dinokit serve` in a real headless Chromium (Debian's package, driven by Playwright):
upload an image, see the results (in the DOM and in the screenshot's pixels), click one, drag a box,
add an image with the token."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve_helpers import IMAGES, MODEL, build_index, serve

import dinokit

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "browser-token"
BAG = IMAGES / "val" / "Bag" / "00018.png"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM}: missing; run `apt-get install -y chromium` (.ci/run does)")
    pytest.importorskip("playwright", reason="pip install playwright (the dev extra)")
    tmp = tmp_path_factory.mktemp("browser")
    images = tmp / "images"
    shutil.copytree(IMAGES / "train", images)
    index = build_index(tmp / "index", images, dinokit.load(str(MODEL)))
    with serve(index, "--token", TOKEN, log_dir=tmp) as s:
        yield s


def _crop(shot: bytes, box: dict[str, float]) -> np.ndarray:
    """The screenshot region of an element, as a 28x28 grayscale float array."""
    img = Image.open(io.BytesIO(shot)).convert("L")
    region = img.crop((round(box["x"]), round(box["y"]), round(box["x"] + box["width"]),
                       round(box["y"] + box["height"])))
    return np.asarray(region.resize((28, 28), Image.BILINEAR), dtype=np.float64)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_page_search_click_box_and_add(server, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"], timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(30_000)
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_function("() => document.getElementById('info').textContent.includes('400 items')")

            # upload: 12 results whose images are loaded; the nearest neighbours of a bag are bags
            page.set_input_files("#pick", str(BAG))
            page.wait_for_selector("#results .card")
            page.wait_for_function("() => [...document.querySelectorAll('#results img')].length === 12 && "
                                   "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth === 28)")
            paths = page.locator("#results .card .path").all_text_contents()
            assert len(paths) == 12 and sum("Bag/" in t for t in paths) >= 9, paths
            shot = page.screenshot(path=str(tmp_path / "results.png"), full_page=True)

            # the pixels: the grid is not blank, and each of the first cards shows its stored image
            grid = _crop(shot, page.locator("#results").bounding_box())
            assert grid.std() > 20
            ids = [int(v) for v in page.locator("#results .card").evaluate_all("cs => cs.map(c => c.dataset.id)")]
            for j in range(3):
                shown = _crop(shot, page.locator("#results .card img").nth(j).bounding_box())
                stored = np.asarray(Image.open(io.BytesIO(server_image(server, ids[j]))).convert("L"), dtype=np.float64)
                assert _corr(shown, stored) > 0.9, j
                assert _corr(shown, _crop(shot, page.locator("#results .card img").nth(j + 3).bounding_box())) < 0.999

            # click the fourth result: it becomes the query and comes back first with score 1
            page.locator("#results .card").nth(3).click()
            page.wait_for_function(f"() => document.querySelector('#results .card').dataset.id === '{ids[3]}'")
            assert page.locator("#results .card .score").first.text_content() == "1.000"
            page.wait_for_function("() => document.getElementById('query-img').naturalWidth === 28")

            # drag a box on the query: a region search, drawn as a red rectangle
            q = page.locator("#query-wrap").bounding_box()
            before = page.locator("#status").text_content()
            page.mouse.move(q["x"] + 20, q["y"] + 20)
            page.mouse.down()
            page.mouse.move(q["x"] + 120, q["y"] + 150, steps=5)
            page.mouse.up()
            page.wait_for_function(f"() => document.getElementById('status').textContent !== {before!r} && "
                                   "document.getElementById('status').textContent.includes('results')")
            assert page.locator("#box").is_visible()
            page.screenshot(path=str(tmp_path / "box.png"), full_page=True)

            # add an image with the token
            page.locator("#add summary").click()
            page.fill("#token", TOKEN)
            page.set_input_files("#add-files", str(BAG))
            page.fill("#add-meta", '[{"sku": "from-the-page"}]')
            page.click("#add-btn")
            page.wait_for_function("() => document.getElementById('add-out').textContent.startsWith('added ids 400')")
            page.wait_for_function("() => document.getElementById('info').textContent.includes('401 items')")

            # the API docs render offline (Swagger UI served by dinokit) and list the endpoints
            page.goto(server.url + "/docs")
            page.locator(".opblock-summary-path", has_text="/items/{item_id}/image").first.wait_for()
            assert page.locator(".opblock-summary-path").count() >= 7
        finally:
            browser.close()
    assert errors == []
    assert requests and all(u.startswith(server.url + "/") or u.startswith("blob:") for u in requests), requests


def server_image(server, item_id: int) -> bytes:
    with server.client() as c:
        return c.get(f"/items/{item_id}/image").content
