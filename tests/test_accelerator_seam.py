"""Every ``torch.cuda`` call of the package goes through ``stepvideo/accelerator.py`` (the one
object ``benchmark/rehearse.py`` swaps for fake CUDA devices)."""
import ast
from pathlib import Path

import torch

from stepvideo import accelerator as seam

PACKAGE = Path(__file__).resolve().parents[1] / "stepvideo"
SEAM = PACKAGE / "accelerator.py"


def _cuda_uses(path: Path):
    """Line numbers where ``torch.cuda`` is named in code (docstrings and comments don't count)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr == "cuda" and isinstance(node.value, ast.Name)
                and node.value.id == "torch"):
            lines.append(node.lineno)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch.cuda"):
            lines.append(node.lineno)
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.cuda") for a in node.names):
            lines.append(node.lineno)
    return lines


def test_torch_cuda_is_named_only_in_the_seam():
    offenders = [f"{p.relative_to(PACKAGE.parent)}:{line}" for p in sorted(PACKAGE.rglob("*.py")) if p != SEAM
                 for line in _cuda_uses(p)]
    assert not offenders, (
        "torch.cuda used outside stepvideo/accelerator.py; call accelerator().<method> instead "
        "(add the method to CudaAccelerator if it is missing): " + ", ".join(offenders))


def test_the_seam_answers_with_torch_cuda_and_can_be_swapped():
    assert seam.accelerator().is_available() == torch.cuda.is_available()

    class Answer:
        def is_available(self):
            return True

    with seam.using(Answer()) as fake:
        assert seam.accelerator() is fake
    assert isinstance(seam.accelerator(), seam.CudaAccelerator)
