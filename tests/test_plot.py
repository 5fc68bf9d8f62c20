"""plot.py through its real command line, on synthetic results.csv files."""

import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

PLOT = Path(__file__).resolve().parents[1] / "plot.py"
HEADER = ("epoch,train_loss,train_error,valid_loss,valid_error,test_error,test_loss,lr,"
          "epoch_seconds,images_per_second,peak_memory_mb")
GPLEISS_HEADER = "epoch,train_loss,train_error,valid_loss,valid_error,test_error"


def epoch_rows(epochs=20, offset=0.0, milestones=(10, 15)):
    """Rows of plausible curves in demo.py's layout; validation and test errors wobble."""
    rows = []
    for epoch in range(1, epochs + 1):
        lr = 0.1 * 0.1 ** sum(epoch > milestone for milestone in milestones)
        progress = epoch / epochs
        train_error = 0.6 * math.exp(-4 * progress) + 0.01 + offset
        valid_error = 0.7 * math.exp(-3 * progress) + 0.08 + offset + 0.02 * math.sin(epoch)
        test_error = valid_error + 0.01 * math.cos(epoch)
        rows.append(f"{epoch},{2.5 * train_error:.4f},{train_error:.4f},{2.6 * valid_error:.4f},"
                    f"{valid_error:.4f},{test_error:.4f},{2.6 * test_error:.4f},{lr:g},12.5,4000,")
    return rows


def write_csv(folder, rows, header=HEADER, end="\n"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.csv").write_text(header + "\n" + "\n".join(rows) + end)
    return folder


def best(rows, column):
    """The annotation plot.py should write for the smallest value of a column (first if tied)."""
    index = HEADER.split(",").index(column)
    values = [(float(row.split(",")[index]), int(row.split(",")[0])) for row in rows]
    value, epoch = min(values, key=lambda pair: pair[0])
    return f"{100 * value:.2f}% (epoch {epoch})"


@pytest.fixture(scope="session")
def poisoned_torch(tmp_path_factory):
    """A folder whose `torch` package fails loudly on import; put first on PYTHONPATH."""
    root = tmp_path_factory.mktemp("poison")
    (root / "torch").mkdir()
    (root / "torch" / "__init__.py").write_text(
        "import sys\nsys.stderr.write('POISON: torch was imported\\n')\n"
        "raise ImportError('plot.py must not import torch')\n")
    return root


@pytest.fixture
def run_plot(poisoned_torch):
    """Run plot.py with the given arguments; every call also checks torch is never imported."""
    def run(*args):
        env = {**os.environ, "PYTHONPATH": str(poisoned_torch)}
        result = subprocess.run([sys.executable, str(PLOT), *map(str, args)], env=env,
                                capture_output=True, text=True, timeout=120)
        assert "POISON" not in result.stderr
        return result
    return run


def svg_text(path):
    """The text elements of an SVG written by plot.py (it keeps text as text)."""
    return [re.sub(r"\s+", " ", text).strip()
            for text in re.findall(r"<text[^>]*>([^<]*)</text>", path.read_text())]


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_poisoned_torch_is_effective(poisoned_torch):
    result = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True,
                            text=True, env={"PYTHONPATH": str(poisoned_torch)})
    assert result.returncode != 0 and "POISON" in result.stderr


def test_one_run_default_out_is_idempotent(tmp_path, run_plot):
    run = write_csv(tmp_path / "densenet40", epoch_rows())
    first = run_plot(run)
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""
    image = run / "curves.png"
    width, height = png_size(image)
    assert 800 <= width <= 4000 and 300 <= height < width
    assert 20_000 < image.stat().st_size < 5_000_000
    first_bytes = image.read_bytes()

    # Again, naming the CSV this time: same default location, same bytes, nothing left over.
    second = run_plot(run / "results.csv")
    assert second.returncode == 0, second.stderr
    assert image.read_bytes() == first_bytes
    assert sorted(path.name for path in tmp_path.rglob("*")) == [
        "curves.png", "densenet40", "results.csv"]


@pytest.mark.parametrize("extension, magic", [("png", b"\x89PNG"), ("pdf", b"%PDF"),
                                              ("svg", b"<svg")])
def test_formats_follow_the_extension_and_are_reproducible(tmp_path, run_plot, extension,
                                                           magic):
    run = write_csv(tmp_path / "run", epoch_rows())
    out = tmp_path / "figures" / f"curves.{extension}"
    out.parent.mkdir()
    result = run_plot(run, "--out", out)
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert magic in data[:1000]
    assert 5_000 < len(data) < 5_000_000
    result = run_plot(run, "--out", out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == data
    assert [path.name for path in out.parent.iterdir()] == [out.name]


def test_several_runs_are_overlaid_with_a_legend(tmp_path, run_plot):
    rows = {"k12": epoch_rows(), "k24": epoch_rows(15, offset=-0.02), "no_drop": epoch_rows(
        12, offset=0.03, milestones=())}
    runs = [write_csv(tmp_path / name, run_rows) for name, run_rows in rows.items()]
    out = tmp_path / "comparison.svg"
    result = run_plot(*runs, "--out", out)
    assert result.returncode == 0, result.stderr
    texts = svg_text(out)
    for name, run_rows in rows.items():
        assert name in texts
        assert f"best valid {best(run_rows, 'valid_error')}" in texts
        assert f"best test {best(run_rows, 'test_error')}" in texts
    assert {"train", "validation", "test", "lr drop"} <= set(texts)
    assert "top-1 error (%)" in texts and "cross-entropy loss" in texts
    assert not (tmp_path / "k12" / "curves.png").exists()


def test_several_runs_with_the_same_folder_name_show_their_paths(tmp_path, run_plot):
    runs = [write_csv(tmp_path / group / "seed1", epoch_rows(8)) for group in ("a", "b")]
    out = tmp_path / "seeds.svg"
    result = run_plot(*runs, "--out", out)
    assert result.returncode == 0, result.stderr
    assert {str(run) for run in runs} <= set(svg_text(out))


@pytest.mark.parametrize("last_line", ["21,0.31,0.1", "21,0.31,0.1\n",
                                       "21,0.3,0.1,0.03,0.01,0.01,0.03,0.001,12.5,4000,"])
def test_unfinished_last_line_is_ignored_with_a_note(tmp_path, run_plot, last_line):
    rows = epoch_rows()
    run = write_csv(tmp_path / "running", rows, end="\n" + last_line)
    out = tmp_path / "running.svg"
    result = run_plot(run, "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("note:") and "line 22" in result.stderr
    # The last complete epoch is still drawn; the unfinished row would have been the best.
    assert f"best valid {best(rows, 'valid_error')}" in svg_text(out)


def test_resumed_run_keeps_the_last_row_of_a_repeated_epoch(tmp_path, run_plot):
    rows = epoch_rows()
    # Epochs 5 and 6 were logged, then the run resumed from epoch 4 and logged them again.
    stale = [with_field(row, 4, "0.0010") for row in rows[4:6]]
    run = write_csv(tmp_path / "resumed", rows[:4] + stale + rows[4:])
    out = tmp_path / "resumed.svg"
    result = run_plot(run, "--out", out)
    assert result.returncode == 0, result.stderr
    assert f"best valid {best(rows, 'valid_error')}" in svg_text(out)


def test_gpleiss_layout_shows_the_final_test_error(tmp_path, run_plot):
    rows = [f"{epoch:03d},{2.0 - 0.1 * epoch:.4f},{0.5 - 0.02 * epoch:.4f},"
            f"{2.1 - 0.1 * epoch:.4f},{0.55 - 0.02 * epoch + 0.03 * (epoch == 10):.4f},"
            for epoch in range(1, 11)]
    run = write_csv(tmp_path / "gpleiss", rows + [",,,,,0.0712"], header=GPLEISS_HEADER)
    out = tmp_path / "gpleiss.svg"
    result = run_plot(run, "--out", out)
    assert result.returncode == 0, result.stderr
    texts = svg_text(out)
    assert "final test 7.12% (epoch 10)" in texts
    assert "best valid 37.00% (epoch 9)" in texts
    assert not any(text.startswith("best test") for text in texts)
    assert "lr drop" not in texts  # no lr column


def test_options(tmp_path, run_plot):
    rows = epoch_rows()
    run = write_csv(tmp_path / "run", rows)
    plain, options, test_only = tmp_path / "plain.svg", tmp_path / "options.svg", tmp_path / "t.svg"
    results = [
        run_plot(run, "--out", plain),
        run_plot(run, "--out", options, "--log_error", "True", "--smooth", "5",
                 "--splits", "valid,test", "--title", "DenseNet, CIFAR"),
        run_plot(run, "--out", test_only, "--splits", "test", "--title", "DenseNet-BC (k=12)"),
    ]
    assert [result.returncode for result in results] == [0, 0, 0], results
    plain_texts, option_texts, test_texts = map(svg_text, (plain, options, test_only))

    assert "top-1 error (%)" in plain_texts and "train" in plain_texts
    assert not any("moving average" in text for text in plain_texts)

    assert "top-1 error (%, log scale)" in option_texts
    # The error axis spans about 2% to 50%: linear ticks every 10%, log ticks at 2, 5, 10, 20, 50.
    assert "30" in plain_texts and "30" not in option_texts
    assert "5-epoch moving average" in option_texts
    assert "DenseNet, CIFAR" in option_texts
    assert "train" not in option_texts and "validation" in option_texts
    # Markers keep the raw values when the curves are smoothed.
    assert f"best valid {best(rows, 'valid_error')}" in option_texts

    assert "DenseNet-BC (k=12)" in test_texts
    assert "validation" not in test_texts and "train" not in test_texts
    assert f"best test {best(rows, 'test_error')}" in test_texts
    assert not any(text.startswith("best valid") for text in test_texts)


def csv_in(tmp, name, text, encoding="utf-8"):
    (tmp / name).mkdir()
    (tmp / name / "results.csv").write_bytes(text.encode(encoding))
    return tmp / name


def with_field(row, index, value):
    fields = row.split(",")
    fields[index] = value
    return ",".join(fields)


def a_folder(path):
    path.mkdir()
    return path


ROWS = epoch_rows(5)
# Each case builds what it needs in a temporary folder and returns plot.py's arguments.
BAD_INPUTS = {
    "missing folder": lambda tmp: [tmp / "nowhere"],
    "missing file": lambda tmp: [tmp / "nowhere.csv"],
    "folder without results.csv": lambda tmp: [a_folder(tmp / "no_csv")],
    "empty csv": lambda tmp: [csv_in(tmp, "empty", "")],
    "header only": lambda tmp: [csv_in(tmp, "header_only", HEADER + "\n")],
    "non-numeric value": lambda tmp: [write_csv(tmp / "text", [with_field(ROWS[0], 4, "n/a")])],
    "error above 1": lambda tmp: [write_csv(tmp / "percent", [with_field(ROWS[0], 2, "12.5")])],
    "fields missing mid-file": lambda tmp: [write_csv(tmp / "short", ["1,0.5"] + ROWS[1:])],
    "not a csv": lambda tmp: [csv_in(tmp, "binary", "\x00\x01,\x02\n\x03\x04\n")],
    "not utf-8": lambda tmp: [csv_in(tmp, "latin", "epoch,train_loss\n1,0.5\u00e9\n",
                                     encoding="latin-1")],
    "no needed columns": lambda tmp: [write_csv(tmp / "columns", ["1,2"], header="a,b")],
    "epoch only": lambda tmp: [write_csv(tmp / "epoch_only", ["1,0.1"], header="epoch,lr")],
    "unknown split": lambda tmp: [write_csv(tmp / "run", ROWS), "--splits", "train,bogus"],
    "no split": lambda tmp: [write_csv(tmp / "run", ROWS), "--splits", ","],
    "bad smooth": lambda tmp: [write_csv(tmp / "run", ROWS), "--smooth", "-1"],
    "bad log_error": lambda tmp: [write_csv(tmp / "run", ROWS), "--log_error", "maybe"],
    "bad out extension": lambda tmp: [write_csv(tmp / "run", ROWS), "--out", tmp / "a.jpg"],
    "out folder missing": lambda tmp: [write_csv(tmp / "run", ROWS), "--out",
                                       tmp / "missing" / "a.png"],
    "out parent is a file": lambda tmp: [write_csv(tmp / "run", ROWS), "--out",
                                         tmp / "run" / "results.csv" / "a.png"],
    "out is a folder": lambda tmp: [write_csv(tmp / "run", ROWS), "--out",
                                    a_folder(tmp / "folder.png")],
    "several runs without out": lambda tmp: [write_csv(tmp / "a", ROWS),
                                             write_csv(tmp / "b", ROWS)],
    "no run": lambda tmp: [],
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_error_line(tmp_path, run_plot, case):
    args = BAD_INPUTS[case](tmp_path)
    before = sorted(tmp_path.rglob("*"))
    result = run_plot(*args)
    assert result.returncode == 2, result
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(tmp_path.rglob("*")) == before  # no image, no temporary file left


def test_no_label_overlaps_another(tmp_path):
    """Best and final marks at the same, last epoch for several runs: every text stays apart."""
    from matplotlib.text import Text

    import plot

    rows = [f"{epoch:03d},{2.0 - 0.1 * epoch:.4f},{0.5 - 0.02 * epoch:.4f},"
            f"{2.1 - 0.1 * epoch:.4f},{0.55 - 0.02 * epoch:.4f},{0.56 - 0.02 * epoch:.4f}"
            for epoch in range(1, 11)]
    runs = [write_csv(tmp_path / name, [*rows, ",,,,,0.3500"], header=GPLEISS_HEADER)
            for name in ("first", "second", "third")]
    loaded = [(run.name, *plot.read_results(run / "results.csv")) for run in runs]
    figure = plot.draw(loaded, list(plot.SPLITS), log_error=False, smooth=0, title="overlap")
    renderer = figure.canvas.get_renderer()
    figure.draw(renderer)
    ticks = {id(label) for axes in figure.axes for axis in (axes.xaxis, axes.yaxis)
             for label in axis.get_ticklabels(which="both")}  # laid out by matplotlib itself
    boxes = [(text.get_text(), text.get_window_extent(renderer))
             for text in figure.findobj(Text)
             if text.get_visible() and text.get_text().strip() and id(text) not in ticks]
    marks = [label for label, _ in boxes if label.startswith(("best", "final"))]
    assert len(marks) == 9  # best valid, best test and final test of each of the three runs
    for i, (label, box) in enumerate(boxes):
        for other, other_box in boxes[i + 1:]:
            assert not box.overlaps(other_box), (label, other)
