"""What people read on the gallery and the compare page: seeds and Chinese prompts.

The pages are built from a hand-written run folder (real mp4s, manifest lines as the runner
writes them, the reference-noise seed ``None``), then opened in headless Chromium: a script
appended to a copy of each page measures, with the page's own font stack, whether Chinese text
draws as glyphs or as "tofu" boxes (all boxes look alike; glyphs differ, and CJK glyphs are one em
wide). One screenshot of the gallery is kept (``render_gallery_screenshot`` wrote
docs/gallery_chinese.png).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from stepvideo.evaluation import manifest as mf
from stepvideo.evaluation.gallery import build_gallery
from stepvideo.io.video import write_mp4
from stepvideo.quality.compare import compare_runs
from stepvideo.quality.report_html import build_compare_page

ROWS = [("001", "Animals", "一只猫在草地上奔跑，阳光明媚", None),
        ("002", "Scenery", "城市夜景，车流如织，霓虹灯闪烁", None),
        ("003", "Food", "一碗热气腾腾的牛肉面", 7)]
PROBE = "一只猫在草地上奔跑"
MEASURE_JS = """<script>
(function () {
  var family = getComputedStyle(document.querySelector('.prompt')).fontFamily;
  var canvas = document.createElement('canvas'); canvas.width = 64; canvas.height = 64;
  var ctx = canvas.getContext('2d');
  ctx.font = '40px ' + family; ctx.textBaseline = 'top'; ctx.fillStyle = '#000';
  function ink(ch) {
    ctx.clearRect(0, 0, 64, 64); ctx.fillText(ch, 8, 8);
    var data = ctx.getImageData(0, 0, 64, 64).data, alpha = [];
    for (var i = 3; i < data.length; i += 4) alpha.push(data[i]);
    return alpha;
  }
  var chars = Array.from('%s'), images = chars.map(ink), distinct = 0;
  for (var i = 1; i < images.length; i++)
    if (images[i].some(function (v, k) { return v !== images[0][k]; })) distinct++;
  var result = {family: family, chars: chars.length, distinct_from_first: distinct,
                em_per_char: ctx.measureText(chars.join('')).width / 40 / chars.length};
  document.body.setAttribute('data-cjk', JSON.stringify(result));
})();
</script>""" % PROBE


def _run_folder(root: Path) -> Path:
    """Three finished items as the evaluation runner records them; two with the reference noise."""
    yy, xx = np.mgrid[0:64, 0:64]
    for index, (item_id, category, prompt, seed) in enumerate(ROWS, start=1):
        rel = f"{category}/{item_id}.mp4"
        frames = np.stack([np.stack([xx * 4 + t, yy * 4, np.full_like(xx, 40 * index)], -1) for t in range(17)])
        write_mp4(root / rel, frames.astype(np.uint8))
        mf.append_record(root / mf.MANIFEST, {
            "id": item_id, "index": index, "category": category, "prompt": prompt, "status": mf.STATUS_OK,
            "path": rel, "seed": seed, "error": None,
            "sampling": {"seed": seed, "num_inference_steps": 50, "guidance_scale": 9.0, "num_frames": 17,
                         "height": 64, "width": 64}})
    return root


def _measure(page: Path, chromium) -> dict:
    probe = page.with_name("measure-" + page.name)
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", MEASURE_JS + "</body>"), encoding="utf-8")
    dom = chromium("--dump-dom", probe.as_uri()).stdout
    match = re.search(r'data-cjk="([^"]+)"', dom)
    assert match, dom[-2000:]
    return json.loads(match.group(1).replace("&quot;", '"'))


def _assert_glyphs(measured: dict) -> None:
    """Tofu boxes are one image for every character; real glyphs differ, each one em wide."""
    assert measured["distinct_from_first"] == measured["chars"] - 1, measured
    assert 0.95 <= measured["em_per_char"] <= 1.05, measured


def render_gallery_screenshot(root: Path, out: Path, chromium) -> Path:
    """The gallery of ``root`` as a PNG ``out`` (1000x560 window)."""
    page = build_gallery(root, title="Step-Video evaluation: 中文提示词")
    chromium("--hide-scrollbars", "--window-size=1000,560", f"--screenshot={out}", page.as_uri())
    return out


@pytest.fixture()
def run_folder(tmp_path):
    return _run_folder(tmp_path / "run")


def test_gallery_names_the_reference_noise_and_draws_chinese(run_folder, tmp_path, headless_chromium):
    page = build_gallery(run_folder).read_text(encoding="utf-8")
    assert "None" not in page
    assert page.count("seed: reference noise") == 2 and page.count("seed: 7") == 1
    assert all(row[2] in page for row in ROWS)
    assert [r["seed"] for r in mf.read_records(run_folder / mf.MANIFEST)] == [None, None, 7]   # records keep null
    measured = _measure(run_folder / "index.html", headless_chromium)
    _assert_glyphs(measured)
    assert "Noto Sans CJK SC" in measured["family"] and "Microsoft YaHei" in measured["family"]
    shot = render_gallery_screenshot(run_folder, tmp_path / "gallery.png", headless_chromium)
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1000, 560) and np.asarray(image.convert("L")).std() > 10


def test_compare_page_names_the_reference_noise_and_draws_chinese(run_folder, tmp_path, headless_chromium):
    comparison = compare_runs(run_folder, run_folder)
    page_path = build_compare_page(comparison, tmp_path / "compare")
    page = page_path.read_text(encoding="utf-8")
    assert "None" not in page
    assert page.count("seed: reference noise") == 2 and page.count("seed: 7") == 1
    assert all(item["seed_a"] is None for item in comparison.items[:2])        # the machine record keeps null
    _assert_glyphs(_measure(page_path, headless_chromium))
