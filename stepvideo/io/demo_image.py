"""Where the demo first-frame images live, in a checkout and in an installed package.

    demo_image_path()                  # .../assets/demo.png (992x544)
    demo_image_path(portrait=True)     # .../assets/demo_portrait.png (544x992)

One copy exists: the repository's top-level ``assets/`` folder (rendered by
``assets/make_demo.py``). ``setup.py`` installs that folder as ``stepvideo/assets/``, so an
installed package finds it inside itself and a checkout finds it beside the package.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]          # .../stepvideo
LANDSCAPE, PORTRAIT = "demo.png", "demo_portrait.png"


def demo_image_path(portrait: bool = False) -> Path:
    """The packaged copy (``stepvideo/assets/``) or the checkout's ``assets/``, whichever exists."""
    name = PORTRAIT if portrait else LANDSCAPE
    candidates = (PACKAGE / "assets" / name, PACKAGE.parent / "assets" / name)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"the demo image {name} is missing (looked in {', '.join(str(p.parent) for p in candidates)});"
                            " regenerate it with `python assets/make_demo.py` or reinstall stepvideo")
