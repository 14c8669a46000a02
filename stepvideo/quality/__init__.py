"""Quality tools: compare two evaluation runs, score one run, check which speed options are lossless.

* :mod:`.metrics` - PSNR / SSIM / pixel differences in torch;
* :mod:`.compare` - item-by-item comparison of two runs (``benchmark/compare.py``);
* :mod:`.report_html` - the comparison page (side-by-side videos, difference heat maps);
* :mod:`.scores` - text-video alignment (Chinese-CLIP), temporal consistency, motion
  (``benchmark/score.py``);
* :mod:`.lossless` - the speed-option table (``benchmark/lossless.py``).

Nothing heavy is imported here.
"""
