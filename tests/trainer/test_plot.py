"""Report charts are valid SVG with a line per series and round axis ticks."""

import xml.etree.ElementTree as ET

from trainer.plot import line_chart, nice_ticks

SVG = "{http://www.w3.org/2000/svg}"


def test_ticks_are_round_numbers_inside_the_range() -> None:
    assert nice_ticks(0, 300) == [0, 100, 200, 300]
    assert nice_ticks(1.88, 3.33) == [2.0, 2.5, 3.0]
    assert nice_ticks(0.001, 0.0043) == [0.001, 0.002, 0.003, 0.004]
    assert nice_ticks(5, 5) == [5]


def test_chart_has_one_polyline_per_series_with_every_point() -> None:
    series = {"loss": [(i, 9 - 0.01 * i) for i in range(50)], "val <bpb>": [(0, 3.1), (49, 2.4)]}
    root = ET.fromstring(line_chart(series, "title & more", "step", "loss"))
    lines = root.findall(f"{SVG}polyline")
    assert [len(line.get("points").split()) for line in lines] == [50, 2]
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "title & more" in texts and "val <bpb>" in texts  # escaped in the file, intact when parsed
    # Higher values are drawn higher up: the falling loss line ends lower (larger y) than it starts.
    first, last = lines[0].get("points").split()[0], lines[0].get("points").split()[-1]
    assert float(last.split(",")[1]) > float(first.split(",")[1])


def test_no_points_no_chart() -> None:
    assert line_chart({"empty": []}, "t", "x", "y") == ""
