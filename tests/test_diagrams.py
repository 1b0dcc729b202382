"""Reliability diagrams are written as PNGs of the documented size, also for empty shot groups."""
import torch
from PIL import Image

from longtail.calibration.diagrams import DPI, PANEL_SIZE, reliability_diagram, reliability_diagrams_by_group


def logits_and_targets(n=600, classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * 2
    return z * 3, torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)


def assert_png(path, width, height):
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (width, height)


def test_reliability_diagram_writes_png(tmp_path):
    logits, targets = logits_and_targets()
    out = reliability_diagram(logits, targets, tmp_path / "reliability.png", title="test")
    assert_png(out, round(PANEL_SIZE[0] * DPI), round(PANEL_SIZE[1] * DPI))


def test_reliability_diagrams_by_group_four_panels_even_with_an_empty_group(tmp_path):
    logits, targets = logits_and_targets()
    counts = [500, 300, 50, 40, 30, 25]  # many and medium only: the few-shot panel says it has no samples
    out = reliability_diagrams_by_group(logits, targets, counts, tmp_path / "by_group.png", n_bins=10)
    assert_png(out, round(4 * PANEL_SIZE[0] * DPI), round(PANEL_SIZE[1] * DPI))
