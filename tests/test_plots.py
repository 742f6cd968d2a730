"""The reports' SVG charts: well-formed, every mark where its number says, the heatmap's pixels exact."""

from __future__ import annotations

import base64
import re
import struct
import xml.etree.ElementTree as ET
import zlib

import numpy as np
import pytest

from curator import plots
from curator.plots import Series

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return root


def decode_png(data: bytes) -> np.ndarray:
    """An 8-bit RGB PNG without filters, as `plots.png` writes it, read back chunk by chunk (CRCs checked)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, {}
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks[kind] = body
        at += 12 + length
    width, height, depth, colour, *_ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour) == (8, 2) and b"IEND" in chunks
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()                       # filter type 0 on every row
    return rows[:, 1:].reshape(height, width, 3)


@pytest.mark.parametrize("low,high", [(0, 1), (0, 1.14), (-0.37, 0.9), (3.1, 3.9), (0, 2e6), (0.3, 0.31), (5, 5)])
def test_ticks_are_round_steps_that_cover_the_range(low, high):
    ticks = plots.nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high and 2 <= len(ticks) <= 8
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0])
    mantissa = steps[0] / 10 ** np.floor(np.log10(steps[0]))
    assert any(np.isclose(mantissa, m) for m in (1, 2, 2.5, 5))


def test_png_holds_the_pixels_it_was_given():
    rgb = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_png(plots.png(rgb)), rgb)


def test_colour_scale_ends_middle_and_missing():
    rgb = plots.colors(np.array([-1.0, 0.0, 1.0, 7.0, np.nan]))
    hexes = ["#%02x%02x%02x" % tuple(int(v) for v in c) for c in rgb]
    assert hexes[:4] == [plots.DIVERGING[0], plots.DIVERGING[5], plots.DIVERGING[-1], plots.DIVERGING[-1]]
    assert tuple(rgb[4]) == (200, 200, 200)
    halfway = plots.colors(np.array([0.1]))[0]             # halfway between the 6th and 7th stops
    a, b = (np.array([int(c[i:i + 2], 16) for i in (1, 3, 5)]) for c in plots.DIVERGING[5:7])
    np.testing.assert_array_equal(halfway, np.rint((a + b) / 2))


def bar_heights(root: ET.Element) -> dict[str, float]:
    """Each bar's tooltip → its height in pixels."""
    return {rect.find(f"{SVG}title").text: float(rect.get("height"))
            for rect in root.iter(f"{SVG}rect") if rect.find(f"{SVG}title") is not None}


def test_bars_are_proportional_to_their_values_and_named():
    panel = plots.bars(["code", "web", "math"], [Series("top 50", [2.0, 1.0, 0.5], "#000"),
                                                  Series("bottom 50", [1.0, 0.0, 4.0], "#111", opacity=0.3)],
                       reference=1.0, title="arithmetic")
    root = parse(plots.svg(panel.width, panel.height, panel.body))
    heights = bar_heights(root)
    assert len(heights) == 6
    unit = heights["code · top 50: 2"] / 2
    assert heights["web · top 50: 1"] == pytest.approx(unit, abs=0.02)
    assert heights["math · bottom 50: 4"] == pytest.approx(4 * unit, abs=0.02)
    assert heights["web · bottom 50: 0"] == 0
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert {"code", "web", "math", "arithmetic"} <= set(texts)
    stacked = parse(plots.stack([panel, panel]))
    assert len(bar_heights(stacked)) == 6 and "bottom 50" in [t.text for t in stacked.iter(f"{SVG}text")]


def test_negative_bars_hang_below_zero():
    panel = plots.bars(["a", "b"], [Series("r", [0.5, -0.25], "#000")])
    root = parse(plots.svg(panel.width, panel.height, panel.body))
    rects = {r.find(f"{SVG}title").text: r for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None}
    up, down = rects["a · r: 0.5"], rects["b · r: -0.25"]
    zero = float(up.get("y")) + float(up.get("height"))
    assert float(down.get("y")) == pytest.approx(zero, abs=0.02)
    assert float(down.get("height")) == pytest.approx(float(up.get("height")) / 2, abs=0.02)


def test_horizontal_bars_share_one_scale():
    root = parse(plots.horizontal(["code (code)", "web (web)"], [Series("documents", [0.25, 0.75], "#000")]))
    widths = {r.find(f"{SVG}title").text: float(r.get("width")) for r in root.iter(f"{SVG}rect")
              if r.find(f"{SVG}title") is not None}
    assert widths["web (web) · documents: 75%"] == pytest.approx(3 * widths["code (code) · documents: 25%"], abs=0.02)


def test_lines_pass_through_their_points_on_a_log_axis():
    percents = [0.1, 1, 10, 100]
    root = parse(plots.lines([Series("factual", [0.2, 0.4, 0.6, 1.0], "#000", x=percents, markers=True)],
                             x_log=True, x_ticks=[(p, f"{p:g}%") for p in percents], y_fmt=plots.percent))
    points = [tuple(map(float, p.split(","))) for p in next(root.iter(f"{SVG}polyline")).get("points").split()]
    xs, ys = np.array(points).T
    assert np.allclose(np.diff(xs), xs[1] - xs[0], atol=0.15)          # equal steps in log10(x)
    assert ys[0] > ys[1] > ys[2] > ys[3]                                # higher share, higher on the page
    assert (ys[0] - ys[1]) == pytest.approx(ys[1] - ys[2], abs=0.15)
    assert len(list(root.iter(f"{SVG}circle"))) == 4


def test_heatmap_pixels_are_the_matrix_in_colour():
    matrix = np.array([[1.0, 0.5, -1.0], [0.5, 1.0, np.nan], [-1.0, np.nan, 1.0]])
    svg = plots.heatmap(matrix, ["arithmetic", "arithmetic", "factual"], label="Pearson r")
    root = parse(svg)
    image = next(root.iter(f"{SVG}image")).get("href")
    pixels = decode_png(base64.b64decode(image.split(",", 1)[1]))
    np.testing.assert_array_equal(pixels, plots.colors(matrix))
    assert [t.text for t in root.iter(f"{SVG}text")].count("arithmetic") == 2     # one label per side
    assert len(re.findall(r'stroke="#000"', svg)) == 2                             # one separator each way


def test_log_ticks_are_powers_of_ten_and_their_halves_and_fifths_inside_the_range():
    assert plots.log_ticks(1000, 64000) == [1000, 2000, 5000, 10000, 20000, 50000]
    assert plots.log_ticks(1, 1e8) == [1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8]
    assert plots.log_ticks(3, 4) == [3, 4]


def test_a_missing_value_breaks_the_line_and_every_dot_names_its_own_point():
    root = parse(plots.lines([Series("loss", [0.1, float("nan"), 0.5, 0.9], "#000", x=[1, 2, 3, 4], markers=True)]))
    lines = list(root.iter(f"{SVG}polyline"))
    assert [len(line.get("points").split()) for line in lines] == [1, 2]
    assert [c.find(f"{SVG}title").text for c in root.iter(f"{SVG}circle")] == ["loss: 1, 0.1", "loss: 3, 0.5",
                                                                              "loss: 4, 0.9"]


def test_long_category_labels_are_cut_and_the_bars_keep_their_room():
    names = [f"query-{'x' * 50}-{i}" for i in range(5)]
    panel = plots.bars(names, [Series("Pearson", [0.5, 0.6, 0.7, 0.8, 0.9], "#000")], height=300, rotate=60)
    root = parse(plots.svg(panel.width, panel.height, panel.body))
    heights = bar_heights(root)
    assert len(heights) == 5 and min(heights.values()) > 50                      # whole names in the tooltips
    assert f"{names[0]} · Pearson: 0.5" in heights
    assert all(len(t.text) <= plots.LABEL_CHARS for t in root.iter(f"{SVG}text"))


def test_two_heatmaps_on_one_page_keep_their_own_colour_scales():
    first = plots.heatmap(np.eye(3), ["a", "a", "b"])
    second = plots.heatmap(-np.eye(3), ["a", "a", "b"])
    ids = [re.search(r'linearGradient id="([^"]+)"', svg).group(1) for svg in (first, second)]
    assert ids[0] != ids[1] and f"url(#{ids[0]})" in first
