"""Training curves from the results.csv files that demo.py writes (reads only CSVs, never torch).

    python plot.py save/run1                          # -> save/run1/curves.png
    python plot.py save/run1 save/run2 --out cmp.pdf --log_error True
"""

import csv
import os
import sys
from pathlib import Path

from cli import check_flags, quiet_interrupt

# Written True or False, or true/false, yes/no, 1/0 in any case (cli.py).
BOOLEAN_ARGS = ("log_error",)
SPLITS = ("train", "valid", "test")
SPLIT_LABELS = {"train": "train", "valid": "validation", "test": "test"}
LINESTYLES = {"train": "--", "valid": "-.", "test": "-"}
METRICS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("loss", "error"))
FORMATS = ("png", "pdf", "svg")
# Without dates in the metadata and with a fixed SVG id salt, rerunning gives identical files.
SAVE_METADATA = {"png": {}, "pdf": {"CreationDate": None}, "svg": {"Date": None}}
SAVE_RC = {"svg.hashsalt": "plot.py", "svg.fonttype": "none"}  # SVG text stays searchable text


class PlotError(Exception):
    """Bad input; reported as one 'error:' line with exit status 2."""


def plot(*runs, out=None, log_error=False, smooth=0, splits="train,valid,test", title=None):
    """Draw loss and top-1 error (%) against epoch for one or more training runs.

    One figure with two panels (loss; error in %). Runs are overlaid with one colour per run and
    one line style per split. The best validation and test errors are marked on the curves, with
    their value and epoch in the legend beside the panels (where no label can overlap another),
    and dotted vertical lines show where the learning rate dropped (from the lr column).
    Works on a run still in progress (an unfinished last line is ignored) and on the older CSV
    layout of gpleiss' demo (its final test error is marked at the last epoch as "final test").

    Args:
        runs: one or more --save folders of demo.py (holding results.csv) or paths to CSV files.
        out: the image to write, in the format its extension names (.png, .pdf or .svg).
            By default <run folder>/curves.png for a single run; required with several runs.
        log_error: True for a logarithmic error axis.
        smooth: moving-average window in epochs for the curves; 0 (default) or 1 is no
            smoothing. The raw curves stay visible faintly and the markers show raw values.
        splits: comma-separated splits to show, any of train,valid,test (default: all three).
        title: a title for the figure (default: none).
    """
    shown_splits = parse_splits(splits)
    if not isinstance(log_error, bool):
        raise PlotError(f"--log_error must be True or False (or true/false, yes/no, 1/0), "
                        f"not {log_error!r}")
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 0:
        raise PlotError(f"--smooth must be a whole number of epochs >= 0, not {smooth!r}")
    if isinstance(title, (tuple, list)):  # fire turns "a, b" into a tuple
        title = ", ".join(str(part) for part in title)
    elif title is not None:
        title = str(title)
    if not runs:
        raise PlotError("give at least one run folder or results.csv (see --help)")
    if out is None and len(runs) > 1:
        raise PlotError("--out is required with several runs, e.g. --out comparison.png")
    if out is not None:
        out = Path(str(out)).expanduser()  # also in --out=~/x, where the shell leaves ~ alone
        check_out(out)

    csv_paths = [find_csv(Path(str(run)).expanduser()) for run in runs]
    names = [csv_path.parent.resolve().name for csv_path in csv_paths]
    if len(set(names)) < len(names):  # e.g. a/seed1 and b/seed1: show the paths as given
        names = [str(run) for run in runs]
    loaded = [(name, *read_results(csv_path))
              for name, csv_path in zip(names, csv_paths, strict=True)]

    out = out if out is not None else csv_paths[0].parent / "curves.png"
    check_out(out)
    figure = draw(loaded, shown_splits, log_error, smooth, title)
    save_atomically(figure, out)


def parse_splits(splits):
    """Return the known split names asked for, in train, valid, test order."""
    names = splits.split(",") if isinstance(splits, str) else splits
    if not isinstance(names, (tuple, list)):
        raise PlotError(f"--splits must be a comma-separated list of train,valid,test, "
                        f"not {splits!r}")
    names = [str(name).strip() for name in names if str(name).strip()]
    unknown = [name for name in names if name not in SPLITS]
    if unknown or not names:
        raise PlotError(f"--splits: unknown split {', '.join(unknown) or '(none given)'}; "
                        "choose from train,valid,test")
    return [split for split in SPLITS if split in names]


def check_out(out):
    """Fail early on an output path that cannot be written."""
    if out.suffix.lower()[1:] not in FORMATS:
        raise PlotError(f"--out {out}: unknown image format {out.suffix or '(no extension)'!r}; "
                        "use .png, .pdf or .svg")
    if not out.parent.is_dir():
        raise PlotError(f"--out {out}: {out.parent} is not an existing folder")
    if not os.access(out.parent, os.W_OK):
        raise PlotError(f"--out {out}: folder {out.parent} is not writable")


def find_csv(run):
    """Return the CSV of a run given as a --save folder or as a CSV file."""
    if not run.exists():
        raise PlotError(f"{run}: no such folder or file")
    if run.is_dir():
        if not (run / "results.csv").is_file():
            raise PlotError(f"{run}: no results.csv in this folder "
                            "(not a --save folder of demo.py?)")
        return run / "results.csv"
    return run


def read_results(csv_path):
    """Return (one float row per epoch sorted by epoch, final test error or None) from a CSV.

    An unfinished last line (no newline at the end or missing fields) is ignored with a note.
    """
    import pandas as pd  # here, so that bad flags are refused without its start-up time

    try:
        text = csv_path.read_text(encoding="utf-8")
        lines = [(number, line) for number, line in enumerate(text.splitlines(True), start=1)
                 if line.strip()]
        rows = [(number, [field.strip() for field in next(csv.reader([line]))])
                for number, line in lines]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise PlotError(f"cannot read {csv_path}: {error}") from None
    if not rows:
        raise PlotError(f"{csv_path} is empty")
    header = rows[0][1]
    if "epoch" not in header or not any(metric in header for metric in METRICS):
        raise PlotError(f"{csv_path}: needs an epoch column and at least one of "
                        f"{', '.join(METRICS)}; found columns {','.join(header)[:200]!r}")
    rows = rows[1:]
    if rows and (not lines[-1][1].endswith("\n") or len(rows[-1][1]) != len(header)):
        print(f"note: {csv_path}: ignored the unfinished last line {rows[-1][0]} "
              "(the run may still be writing it)", file=sys.stderr)
        rows = rows[:-1]
    for number, fields in rows:
        if len(fields) != len(header):
            raise PlotError(f"{csv_path}, line {number}: {len(fields)} fields where the header "
                            f"has {len(header)}")

    raw = pd.DataFrame([fields for _, fields in rows], columns=header, dtype=str)
    frame = pd.DataFrame(index=raw.index)
    for column in [name for name in header if name in METRICS or name in ("epoch", "lr")]:
        values = pd.to_numeric(raw[column], errors="coerce")
        bad, why = values.isna() & (raw[column] != ""), "not a number"
        if not bad.any() and column.endswith("_error"):
            bad, why = (values < 0) | (values > 1), "errors are fractions in [0, 1]"
        if bad.any():
            number, fields = rows[bad.to_numpy().argmax()]
            raise PlotError(f"{csv_path}, line {number}: bad {column} value "
                            f"{fields[header.index(column)]!r} ({why})")
        frame[column] = values

    # gpleiss' demo ends with a row that holds only the final test error and no epoch.
    final_rows = frame[frame["epoch"].isna()]
    final_test = None
    if "test_error" in frame and final_rows["test_error"].notna().any():
        final_test = final_rows["test_error"].dropna().iloc[-1]
    # A resumed run may repeat epochs: the last row of each epoch wins.
    frame = frame[frame["epoch"].notna()].drop_duplicates("epoch", keep="last")
    if frame.empty:
        raise PlotError(f"{csv_path} has no epoch rows yet")
    return frame.sort_values("epoch").set_index("epoch"), final_test


def draw(loaded, splits, log_error, smooth, title):
    """Return the two-panel figure for a list of (name, frame, final test error) runs."""
    # matplotlib is imported here so that bad input is reported without its start-up time.
    from matplotlib import rcParams
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

    figure = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, error_axes = figure.subplots(1, 2)
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    any_lr_drop = False
    run_handles = []  # per run: its name, then one entry per marked error
    for index, (name, frame, final_test) in enumerate(loaded):
        color = colors[index % len(colors)]
        last_epoch = frame.index.max()
        run_handles.append(Line2D([], [], color=color, linewidth=2.5, label=name))
        for split in splits:
            for axes, column, scale in ((loss_axes, f"{split}_loss", 1),
                                        (error_axes, f"{split}_error", 100)):
                if column not in frame:
                    continue
                values = frame[column].dropna() * scale
                if log_error and axes is error_axes:
                    values = values[values > 0]
                if values.empty:
                    continue
                style = {"color": color, "linestyle": LINESTYLES[split]}
                if smooth > 1:
                    axes.plot(values.index, values, alpha=0.25, linewidth=1, **style)
                    values = values.rolling(smooth, min_periods=1).mean()
                axes.plot(values.index, values, linewidth=1.6, **style)
                if column in ("valid_error", "test_error"):
                    best_epoch = frame[column].idxmin()  # raw values, also when smoothing
                    run_handles.append(mark(error_axes, best_epoch,
                                            frame[column][best_epoch] * 100, f"best {split}",
                                            color))
        if final_test is not None and "test" in splits:
            run_handles.append(mark(error_axes, last_epoch, final_test * 100, "final test",
                                    color))
        if "lr" in frame:
            lr = frame["lr"].dropna()
            # A drop at epoch e means epoch e ran with the lower rate: draw it where e starts.
            for epoch in lr.index[:-1][lr.to_numpy()[1:] < lr.to_numpy()[:-1]]:
                any_lr_drop = True
                for axes in (loss_axes, error_axes):
                    axes.axvline(epoch, color=color, linestyle=":", linewidth=1.2, alpha=0.8)

    for axes in (loss_axes, error_axes):
        axes.set_xlabel("epoch")
        axes.grid(True, alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_axes.set_ylabel("cross-entropy loss")
    error_axes.set_ylabel("top-1 error (%, log scale)" if log_error else "top-1 error (%)")
    if log_error:
        error_axes.set_yscale("log")
        error_axes.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        error_axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))

    split_handles = [Line2D([], [], color="0.3", linestyle=LINESTYLES[split],
                            label=SPLIT_LABELS[split]) for split in splits]
    if any_lr_drop:
        split_handles.append(Line2D([], [], color="0.3", linestyle=":", label="lr drop"))
    loss_axes.legend(handles=split_handles, loc="upper right", fontsize=9,
                     title=f"{smooth}-epoch moving average" if smooth > 1 else None)
    # Outside the panels, so that no label can cover a curve or another label.
    figure.legend(handles=run_handles, loc="outside right upper", fontsize=9)
    if title:
        figure.suptitle(title)
    return figure


MARKERS = {"best valid": "o", "best test": "v", "final test": "s"}


def mark(axes, epoch, error_percent, what, color):
    """Mark one error value on the curve; return its legend entry (value and epoch)."""
    (marker,) = axes.plot([epoch], [error_percent], marker=MARKERS[what], markersize=8,
                          color=color, markeredgecolor="black", linestyle="none", zorder=5,
                          label=f"{what} {error_percent:.2f}% (epoch {epoch:g})")
    return marker


def save_atomically(figure, out):
    """Write the figure to a temporary file beside `out`, then rename it over `out`."""
    from matplotlib import rc_context

    image_format = out.suffix.lower()[1:]
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with rc_context(SAVE_RC):
                figure.savefig(temporary, format=image_format, dpi=150,
                           metadata=SAVE_METADATA[image_format])
        os.replace(temporary, out)
    except OSError as error:
        raise PlotError(f"cannot write {out}: {error.strerror or error}") from None
    finally:
        temporary.unlink(missing_ok=True)


def main():
    with quiet_interrupt():
        import fire

        argv, _ = check_flags(plot, sys.argv[1:], BOOLEAN_ARGS)
        try:
            fire.Fire(plot, argv)
        except PlotError as error:
            print(f"error: {str(error).replace(chr(10), ' ')}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
