"""Command line: distbp train | eval | predict | data | ckpt | plot (see DESIGN.md)."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import shutil
import sys
import traceback

from . import __version__
from .files.atomic import AtomicFile
from .errors import EXIT_NONFINITE, EXIT_USAGE, NonFiniteError, UserError, agree, on_root
from .reporting.progress import MODES
from .files.safeio import check_output, save_npz, unwritable

EPILOG_TRAIN = """config sections (keys as section.key; every key with its type, default and meaning
is in docs/CONFIG.md):
  {sections}
examples:
  distbp train                                  the default MLP on the shipped digits
  mpirun -n 8 distbp train digits --set train.epochs=50
  distbp train my.toml --set optim.lr=0.01 --run-dir runs/a --resume never
exit codes: 0 done, 2 bad input, 3 non-finite loss, 75 stopped by a signal (resumable)"""


class Parser(argparse.ArgumentParser):
    """argparse that suggests the closest choice ("did you mean ...?") for a mistyped command."""

    def _check_value(self, action, value):
        if action.choices is not None and value not in action.choices:
            close = difflib.get_close_matches(value, list(action.choices), n=1)
            if close:
                raise argparse.ArgumentError(action, f"invalid choice: {value!r} (did you mean {close[0]!r}?)")
        super()._check_value(action, value)

    def error_unknown(self, extras: list[str]):
        """Exit 2 with this (sub)command's usage, naming unknown arguments and the closest option."""
        options = [o for a in self._actions for o in a.option_strings]
        hints = [f"{x!r}: did you mean {close[0]!r}?" for x in extras if x.startswith("-")
                 for close in [difflib.get_close_matches(x.split("=", 1)[0], options, n=1)] if close]
        self.error(f"unrecognized arguments: {' '.join(extras)}" + ("; " + "; ".join(hints) if hints else ""))


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    from .config import SECTIONS
    p = Parser(prog="distbp", description="Data-parallel backprop on CPUs with MPI and HDF5.")
    p.add_argument("--version", action="version", version=f"distbp {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                         help="distbp COMMAND --help shows its options")

    t = sub.add_parser("train", help="train a model (under mpirun/srun: data-parallel)",
                       epilog=EPILOG_TRAIN.format(sections=", ".join(SECTIONS)),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", nargs="?", help="config TOML file or shipped name (digits, digits-cnn, ...; default: digits)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=5 (repeatable)")
    t.add_argument("--run-dir", help="run directory (default: a new runs/<timestamp>)")
    t.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                   help="auto: newest valid checkpoint in the run dir (default); never; or a file")
    t.add_argument("--force", action="store_true",
                   help="with --resume never: move an earlier run's checkpoints and logs to RUN_DIR/old-<time>/")
    t.add_argument("--progress", default="auto", choices=MODES,
                   help="auto: a bar when the terminal you launched from (mpirun/srun included) is a terminal, "
                   "else lines with epoch, percent, samples/s and ETA every train.log_every steps (default)")

    lf = sub.add_parser("lr-find", help="sweep the learning rate exponentially, plot loss against it, suggest one",
                        description="Train the config's model for --steps steps while the learning rate rises "
                        "exponentially from --start to --end (no evaluation, nothing kept but the plot), then "
                        "suggest optim.lr: a third of the rate where the smoothed loss is lowest, and say where "
                        "it diverges. Data-parallel under mpirun, with the config's global batch.")
    lf.add_argument("config", nargs="?", help="config TOML file or shipped name (default: digits)")
    lf.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable)")
    lf.add_argument("--start", type=float, default=1e-6, help="first learning rate (default: %(default)g)")
    lf.add_argument("--end", type=float, default=1.0, help="last learning rate (default: %(default)g)")
    lf.add_argument("--steps", type=int, default=200, help="optimizer steps of the sweep (default: %(default)s)")
    lf.add_argument("-o", "--out", default="lr-find.png", help="plot to write (default: %(default)s; "
                    "needs matplotlib)")
    add_force(lf)

    e = sub.add_parser("eval", help="loss and metrics of a checkpoint on a split (per-class report, confusion "
                       "matrix)")
    add_checkpoint_argument(e)
    e.add_argument("--data", help="dataset file (default: the one the run trained on)")
    e.add_argument("--split", default="val", help="split to evaluate (val, test, train)")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")

    d = sub.add_parser("data", help="make, convert and inspect dataset files")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION", help="what to do")
    dg = dsub.add_parser("digits", help="write the shipped 8x8 digits dataset to a file")
    dg.add_argument("out", help="dataset file to write")
    add_force(dg)
    ds = dsub.add_parser("synthetic", help="write a learnable synthetic classification dataset")
    ds.add_argument("out", help="dataset file to write")
    ds.add_argument("--rows", type=int, default=10000, help="rows in all (default: %(default)s)")
    ds.add_argument("--features", type=int, default=32, help="input features (default: %(default)s)")
    ds.add_argument("--classes", type=int, default=10, help="classes (default: %(default)s)")
    ds.add_argument("--val-fraction", type=float, default=0.2, help="share of rows in val (default: %(default)s)")
    ds.add_argument("--shape", type=_image_shape, default=None, metavar="C,H,W",
                    help="images of this shape instead of --features: a class pattern at a random place in noise")
    ds.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    add_force(ds)
    add_convert_parser(dsub)
    add_text_parser(dsub)
    add_fetch_parser(dsub)
    di = dsub.add_parser("inspect", help="splits, shapes, dtypes, class balance, value ranges")
    di.add_argument("file", help="a distbp dataset file (.h5)")

    c = sub.add_parser("ckpt", help="inspect, verify and export checkpoints")
    csub = c.add_subparsers(dest="ckpt_command", required=True, metavar="ACTION", help="what to do")
    ci = csub.add_parser("inspect", help="step, epoch, config, shapes and sizes")
    add_checkpoint_argument(ci)
    cv = csub.add_parser("verify", help="check the checksum (exit 0 valid, 1 damaged)")
    add_checkpoint_argument(cv)
    ce = csub.add_parser("export", help="parameters, normalization and layer specs as a plain .npz")
    add_checkpoint_argument(ce)
    ce.add_argument("out", help=".npz file to write: one array per parameter, normalization.NAME per statistic "
                    "the inputs are normalized with, and the layer specs and config as JSON text (0-d str arrays, "
                    "read without pickle)")
    add_force(ce)
    add_plot_predict_parsers(sub)
    g = sub.add_parser("generate", help="sample text from a sequence model's checkpoint",
                       description="Continue a prompt with tokens sampled from a checkpoint's sequence model "
                       "(trained on `distbp data text` data), decoded with the dataset's vocabulary. One rank "
                       "is enough; the same seed gives the same text.")
    add_checkpoint_argument(g)
    g.add_argument("--prompt", default="", help="text to continue (default: a newline)")
    g.add_argument("--tokens", type=int, default=200, help="tokens to generate (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="divides the logits: below 1 surer, above 1 wilder, 0 always the likeliest (default: %(default)s)")
    g.add_argument("--top-k", type=int, help="draw only among the k likeliest tokens (default: all)")
    g.add_argument("--seed", type=int, default=0, help="seed of the draws (default: %(default)s)")
    g.add_argument("--data", help="dataset holding the vocabulary (default: the one the run trained on)")
    return p


EPILOG_CONVERT = """formats (told apart by name and content; .gz files are read as they are):
  one .npz          arrays x and y (or --x-key/--y-key), or x_train, y_train, x_test, ... (keras style)
  two .npy          x then y
  one CSV           numeric feature columns and one label column (--label; header row detected)
  two IDX files     MNIST/Fashion-MNIST images and labels, raw or gzipped, in either order
uint8 inputs stay uint8 with x_scale 1/255 (--x-scale); other inputs become float32. (N, H, W) images
are stored as (N, 1, H, W). Without a val split in the input, --val-fraction 0.1 of train becomes val
(stratified by class for classification).
examples:
  distbp data convert train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz mnist.h5 \\
      --test t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz
  distbp data convert iris.csv iris.h5 --label species --val-fraction 0.2 --seed 1
  distbp data convert houses.csv houses.h5 --label -1 --task regression
  distbp data convert wine_data.csv wine.h5 --skip-rows 1 --label -1
  distbp data convert x.npy y.npy data.h5"""


def add_convert_parser(dsub):
    """distbp data convert's arguments."""
    dc = dsub.add_parser("convert", help="NumPy (.npz, .npy), CSV or MNIST IDX files to a dataset file",
                         description="Convert input files to a distbp dataset file, streaming row blocks "
                         "(inputs larger than memory work), and validate the result.",
                         epilog=EPILOG_CONVERT, formatter_class=argparse.RawDescriptionHelpFormatter)
    dc.add_argument("inputs", nargs="+", metavar="INPUT", help="input file(s) of the training data")
    dc.add_argument("out", metavar="OUT.h5", help="dataset file to write")
    add_force(dc)
    dc.add_argument("--test", nargs="+", default=[], metavar="INPUT",
                    help="input file(s) of a test split, same format (put this option last)")
    dc.add_argument("--task", choices=("classification", "regression", "binary"),
                    help="classification: integer or text labels; regression: float targets (default: "
                    "classification; numeric labels that would make over 100 classes stop with a hint "
                    "unless it is given)")
    dc.add_argument("--label", help="CSV label column: name or 0-based index, -1 = last "
                    "(default: a column named label, target, class or y)")
    dc.add_argument("--columns", type=_column_list, metavar="A,B,...",
                    help="CSV: the feature columns, by name or 0-based index, in this order (default: all but "
                    "the label)")
    dc.add_argument("--drop", type=_column_list, metavar="A,B,...",
                    help="CSV: columns left out, by name or 0-based index (an id, a text column)")
    dc.add_argument("--header", action=argparse.BooleanOptionalAction, default=None,
                    help="CSV: the first row is (not) a header (default: detected)")
    dc.add_argument("--delimiter", help="CSV delimiter (default: detected among , ; tab |)")
    dc.add_argument("--skip-rows", type=int, default=0, metavar="N",
                    help="CSV: skip the first N lines, e.g. a 'n_samples,n_features,...' line (default: 0)")
    dc.add_argument("--val-fraction", type=float, default=None,
                    help="fraction of train rows drawn into a val split (default 0.1; 0 if the input has val)")
    dc.add_argument("--seed", type=int, default=0, help="seed of the val split draw (default: %(default)s)")
    dc.add_argument("--stratify", action=argparse.BooleanOptionalAction, default=None,
                    help="draw the val split per class, keeping class shares (default: on for classification)")
    dc.add_argument("--num-classes", type=int, help="number of classes (default: largest label + 1)")
    dc.add_argument("--x-scale", type=float, help="scale of uint8 inputs (default: 1/255)")
    dc.add_argument("--x-key", default="x", help=".npz array holding x (default: %(default)s)")
    dc.add_argument("--y-key", default="y", help=".npz array holding y (default: %(default)s)")


def add_text_parser(dsub):
    """distbp data text's arguments."""
    dt = dsub.add_parser("text", help="a text file to a token dataset (character or byte vocabulary)",
                         description="Cut a text into windows of --context tokens (x) and the same shifted by one "
                         "(y, the next tokens). The validation split is the contiguous tail of the text; the "
                         "vocabulary is stored in the file.")
    dt.add_argument("file", metavar="FILE", help="the text (UTF-8 for --level char)")
    dt.add_argument("out", metavar="OUT", help="dataset file to write")
    dt.add_argument("--context", type=int, required=True, metavar="T", help="tokens per row (the model's context)")
    dt.add_argument("--level", choices=("char", "byte"), default="char",
                    help="one token per character (vocabulary: the text's characters) or per byte (256 ids) "
                    "(default: %(default)s)")
    dt.add_argument("--val-fraction", type=float, default=0.1, help="share of the text, from its end, in the "
                    "val split (default: %(default)s)")
    dt.add_argument("--stride", type=int, help="tokens between window starts (default: the context, no overlap)")
    dt.add_argument("--dtype", choices=("auto", "uint8", "uint16", "int32"), default="auto",
                    help="dtype of the stored ids (default: the smallest that holds the vocabulary)")
    add_force(dt)


def _column_list(text: str) -> list[str]:
    """'a, b,3' -> ['a', 'b', '3']: CSV column names or indices."""
    return [c.strip() for c in text.split(",") if c.strip()]


def add_checkpoint_argument(p):
    """A checkpoint given as a file or as a run directory, and --best."""
    p.add_argument("checkpoint", metavar="CHECKPOINT|RUN_DIR",
                   help="checkpoint file, or a run directory: its newest valid checkpoint")
    p.add_argument("--best", action="store_true",
                   help="the run directory's best checkpoint (checkpoints/best.h5, from checkpoint.keep_best)")


def checkpoint_path(args, comm) -> str:
    """The checkpoint file args name (a file, a run directory's newest valid one, or its best), on every rank."""
    from .files.checkpoint import find
    return comm.bcast_obj(on_root(comm, lambda: str(find(args.checkpoint, args.best))))


EPILOG_FETCH = """datasets:
  mnist, fashion-mnist   28x28 grayscale digits / clothes: 54,000 train, 6,000 val, 10,000 test
  cifar10                32x32 RGB images (the binary version): 45,000 train, 5,000 val, 10,000 test
  iris                   UCI iris, 4 measurements, 3 species: 120 train, 30 val
val splits are stratified draws from the published train files (seed 0). Every file is checked
against its size and SHA-256 pinned in distbp; raw files are kept in DIR/NAME/, the dataset is DIR/NAME.h5.
A mirror serves MIRROR/NAME/FILE (the publisher's file names); --from DIR takes DIR/FILE.
examples:
  distbp data fetch mnist
  distbp data fetch cifar10 --mirror http://mirror.example.org/datasets/
  distbp data fetch fashion-mnist --from ~/Downloads/fashion-mnist"""


def add_fetch_parser(dsub):
    """distbp data fetch's arguments."""
    from .datasets.fetch import CATALOG, MAX_TIME_S, MIRROR_ENV
    df = dsub.add_parser("fetch", help="download, verify and convert a public dataset (mnist, cifar10, ...)",
                         description="Download a public dataset (resuming partial downloads, with retries), "
                         "verify every file's SHA-256, and convert it to DIR/NAME.h5.",
                         epilog=EPILOG_FETCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    df.add_argument("name", choices=sorted(CATALOG), metavar="NAME", help=f"one of {', '.join(sorted(CATALOG))}")
    df.add_argument("--dir", default="data", help="folder for the dataset and its raw files (default: %(default)s)")
    df.add_argument("--mirror", metavar="URL", help=f"base URL of a mirror serving URL/NAME/FILE (default: "
                    f"${MIRROR_ENV} if set, else the publishers' sites)")
    df.add_argument("--from", dest="source", metavar="DIR", help="take the files from this folder (copied by "
                    "hand) instead of downloading them")
    df.add_argument("--timeout", type=float, default=30.0,
                    help="seconds without data before a download attempt gives up (default: %(default)s)")
    df.add_argument("--max-time", type=float, default=MAX_TIME_S, metavar="SECONDS",
                    help="seconds all the downloads may take together, however the server trickles "
                    "(default: %(default)s)")
    df.add_argument("--retries", type=int, default=5,
                    help="download attempts per file, resuming, with backoff 1, 2, 4, ... s (default: %(default)s)")


def add_plot_predict_parsers(sub):
    """distbp plot's and distbp predict's arguments."""
    pl = sub.add_parser("plot", help="PNG of loss and accuracy curves of one or more runs",
                        description="Plot train/val loss and val accuracy against steps and epochs from "
                        "RUN_DIR/metrics.jsonl, several runs overlaid. Needs matplotlib: "
                        "pip install 'distbp[plot]'.")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (holding metrics.jsonl)")
    pl.add_argument("-o", "--out", default="runs.png", help="PNG file to write (default: %(default)s)")
    add_force(pl)
    pr = sub.add_parser("predict", help="write predictions of a checkpoint (data-parallel under mpirun)",
                        description="Predict with a checkpoint's model: class and probabilities for "
                        "classification, outputs for regression, written to an HDF5 file by rank 0. "
                        "Under mpirun every rank predicts a contiguous slice of the rows.")
    add_checkpoint_argument(pr)
    pr.add_argument("input", metavar="INPUT", help="a distbp dataset file (with --split), an .npy array or a CSV file of inputs "
                    "(feature columns only; header detected)")
    pr.add_argument("out", metavar="OUT", help="predictions file to write: HDF5, or CSV if the name ends in .csv")
    pr.add_argument("--split", default="val", help="split of a dataset input (default: %(default)s)")
    pr.add_argument("--data", help="for .npy/.csv inputs: the dataset giving the task, classes and x_scale "
                    "(default: the one the run trained on)")
    pr.add_argument("--batch", type=int, default=1024, help="rows per forward pass (default: %(default)s)")
    add_force(pr)


def add_force(parser):
    """The --force option of a command that writes an output file."""
    parser.add_argument("--force", action="store_true",
                        help="replace an existing output file (atomically; never one of the inputs)")


def cmd_train(args, comm) -> int:
    """distbp train."""
    from .config import load_config
    from .files.rundir import default_path
    from .training.loop import run
    from .files.rundir import remove_if_empty
    cfg = agree(comm, load_config, args.config or "digits", args.overrides)
    run_dir = args.run_dir or default_path(comm)
    try:
        # keep_stop_handlers: a stop signal from the loop's start to the process's exit only sets a flag
        return run(cfg, comm, run_dir, args.resume, args.force, args.progress, keep_stop_handlers=True,
                   config_file=args.config)["exit_code"]
    except BaseException:
        if comm.is_root and not args.run_dir:  # a failed start leaves no empty runs/<time>
            remove_if_empty(run_dir)
        raise


def cmd_lr_find(args, comm) -> int:
    """distbp lr-find."""
    from pathlib import Path
    from .config import load_config
    from .training.lr_find import find_lr, plot_sweep
    cfg = agree(comm, load_config, args.config or "digits", args.overrides)
    out = agree(comm, check_output, Path(args.out), [], args.force)
    result = find_lr(cfg, comm, args.steps, args.start, args.end)
    if not comm.is_root:
        return 0
    lr, diverged = result["suggested_lr"], result["diverged_at_lr"]
    print(f"learning-rate sweep of {args.steps} steps from {args.start:g} to {args.end:g}: the smoothed loss is lowest "
          f"at lr {result['min_loss_lr']:.3g}" + (f" and diverges from {diverged:.3g}" if diverged else
                                                    ", and does not diverge"))
    print(f"suggested optim.lr = {lr:.2g} (a third of the lowest point's): --set optim.lr={lr:.2g}")
    if diverged and cfg.optim.lr >= diverged:
        print(f"WARNING: the config's optim.lr={cfg.optim.lr:g} is past where the loss diverged ({diverged:.3g})")
    elif cfg.optim.lr > 3 * lr:
        print(f"WARNING: the config's optim.lr={cfg.optim.lr:g} is {cfg.optim.lr / lr:.1f}x the suggestion")
    try:
        print(f"wrote {plot_sweep(result, out, cfg.optim.lr)}")
    except UserError as e:
        print(f"no plot: {e}")
    return 0


def cmd_eval(args, comm) -> int:
    """distbp eval."""
    import json
    from .inference.evaluate import evaluate_checkpoint
    from .reporting.scores import format_report
    result = evaluate_checkpoint(checkpoint_path(args, comm), comm, data_path=args.data, split=args.split)
    if comm.is_root and args.json:
        print(json.dumps(result))
    elif comm.is_root:
        report = result.pop("report", None)
        print(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
        if report:
            print("\n" + "\n".join(format_report(report)))
    return 0


def alone_on_root(cmd, args, comm) -> int:
    """cmd run by rank 0 alone as a world of one (one writer, one printout); its exit code on every rank."""
    from .parallel.comm import SerialComm
    return comm.bcast_obj(on_root(comm, cmd, args, SerialComm()))


def cmd_data(args, comm) -> int:
    """distbp data digits | synthetic | convert | fetch | inspect."""
    from .datasets import dataset as data
    if comm.size > 1 and args.data_command != "convert":
        return alone_on_root(cmd_data, args, comm)
    if args.data_command == "inspect":
        with data.Dataset(args.file) as ds:
            print("\n".join(ds.describe(values=True)))
        return 0
    if args.data_command == "convert":
        from .datasets.convert import convert
        on_root(comm, lambda: convert(  # one writer under mpirun
            args.inputs, args.out, test_inputs=args.test, label=args.label, task=args.task,
            val_fraction=args.val_fraction, seed=args.seed, num_classes=args.num_classes, x_scale=args.x_scale,
            header=args.header, delimiter=args.delimiter, x_key=args.x_key, y_key=args.y_key,
            skip_rows=args.skip_rows, stratify=args.stratify, force=args.force, columns=args.columns,
            drop=args.drop or ()))
        if comm.is_root:
            with data.Dataset(args.out) as ds:
                print("\n".join([f"wrote {args.out}", *ds.describe(values=True)]))
        return 0
    if args.data_command == "text":
        from .datasets.text import text_dataset
        text_dataset(args.file, args.out, args.context, args.level, args.val_fraction, args.stride, args.dtype,
                     args.force)
        with data.Dataset(args.out) as ds:
            print("\n".join([f"wrote {args.out}", *ds.describe()]))
        return 0
    if args.data_command == "fetch":
        from .datasets.fetch import fetch
        out = fetch(args.name, args.dir, mirror=args.mirror, source=args.source, timeout=args.timeout,
                    retries=args.retries, max_time=args.max_time)
        with data.Dataset(out) as ds:
            print("\n".join(ds.describe()))
        return 0
    check_output(args.out, [], args.force)
    if args.data_command == "digits":
        try:
            with AtomicFile(args.out) as out:
                shutil.copyfile(data.digits_path(), out.tmp)
                out.commit(durable=True)
        except OSError as e:
            raise unwritable(args.out, e) from None
    elif args.data_command == "synthetic":
        from .datasets.convert import check_draw_options
        check_draw_options(args.val_fraction, args.seed)
        if args.shape:
            x, y = data.synthetic_images(args.rows, args.shape, args.classes, args.seed)
        else:
            x, y = data.synthetic(args.rows, args.features, args.classes, args.seed)
        n_val = int(round(args.rows * args.val_fraction))
        data.write_dataset(args.out, {"train": (x[n_val:], y[n_val:]), "val": (x[:n_val], y[:n_val])},
                           task="classification", num_classes=args.classes,
                           attrs={"source": f"distbp data synthetic --seed {args.seed}"})
    print(f"wrote {args.out}")
    return 0


def _image_shape(text: str) -> tuple:
    """--shape C,H,W as three positive ints."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be C,H,W, three positive ints, e.g. 3,32,32")
    return shape


def cmd_ckpt(args, comm) -> int:
    """distbp ckpt inspect | verify | export."""
    from .files import checkpoint as ckpt
    if comm.size > 1:
        return alone_on_root(cmd_ckpt, args, comm)
    if args.ckpt_command == "verify":
        try:
            path = ckpt.find(args.checkpoint, args.best)
            ck = ckpt.load(path)
        except ckpt.CheckpointError as e:
            print(f"INVALID: {e}")
            return 1
        print(f"OK: {path} step {ck.attrs['step']} checksum {ck.attrs['checksum']}")
        return 0
    path = ckpt.find(args.checkpoint, args.best)
    ck = ckpt.load(path)
    if args.ckpt_command == "inspect":
        print("\n".join(ckpt.describe(ck)))
    else:
        out = check_output(args.out if args.out.endswith(".npz") else f"{args.out}.npz", [path], args.force)
        try:
            with AtomicFile(out) as target:
                save_npz(target.tmp, export_arrays(ck))
                target.commit(durable=True)
        except OSError as e:
            raise unwritable(out, e) from None
        print(f"wrote {len(ck.params)} parameters, {len(ck.normalization)} normalization statistics and the layer "
              f"specs to {out}")
    return 0


def export_arrays(ck) -> dict:
    """What `ckpt export` writes: the parameters, the normalization (normalization.NAME) and, as JSON text,
    the layer specs (model.layers, or the MLP's from model.hidden and the parameter shapes) and the config."""
    import json
    import numpy as np
    from .nn import mlp_specs
    m = ck.config["model"]
    specs = m["layers"]
    if not specs:
        names = sorted((k for k in ck.params if k.endswith(".W")), key=lambda k: int(k.split(".")[0]))  # in layer order
        weights = [ck.params[k] for k in names]
        flatten = [{"type": "flatten"}] if not names[0].startswith("0.") else []  # image inputs: layer 0 flattens
        specs = flatten + mlp_specs([weights[0].shape[0], *(w.shape[1] for w in weights)], m["activation"],
                                    m["dropout"])
    return {**ck.params, **{f"normalization.{k}": v for k, v in ck.normalization.items()},
            "layers": np.array(json.dumps(specs)), "config": np.array(json.dumps(ck.config))}


def cmd_plot(args, comm) -> int:
    """distbp plot."""
    from .reporting.plot import plot_runs
    out = on_root(comm, plot_runs, args.run_dirs, args.out, args.force)
    if comm.is_root:
        print(f"wrote {out}")
    return 0


def cmd_predict(args, comm) -> int:
    """distbp predict."""
    from .inference.predict import predict
    out = predict(checkpoint_path(args, comm), args.input, args.out, comm, split=args.split, batch=args.batch,
                  data_path=args.data, force=args.force)
    if comm.is_root:
        print(f"wrote {out}")
    return 0


def cmd_generate(args, comm) -> int:
    """distbp generate: rank 0 samples and prints."""
    if comm.size > 1:
        return alone_on_root(cmd_generate, args, comm)
    from .api import load
    model = load(checkpoint_path(args, comm), data_path=args.data)
    if model.vocabulary is None:
        raise UserError(f"{model.checkpoint}: a {model.task} model cannot generate text; HINT: give the checkpoint "
                        "of a run on a `distbp data text` dataset (e.g. distbp train char-transformer)")
    print(model.generate(args.prompt, args.tokens, args.temperature, args.top_k, args.seed))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "data": cmd_data, "ckpt": cmd_ckpt,
            "plot": cmd_plot, "predict": cmd_predict, "generate": cmd_generate, "lr-find": cmd_lr_find}


def dispatch(args, comm) -> int:
    """Run one subcommand; input errors become one message from rank 0 and an exit code."""
    try:
        return COMMANDS[args.command](args, comm)
    except UserError as e:
        if comm.size > 1 and not e.agreed:
            raise  # one rank's error (say a read failing mid-run) while the others wait: abort all
        if comm.is_root:
            if args.debug:
                traceback.print_exc()
            print(f"distbp: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except NonFiniteError as e:
        if comm.is_root:
            print(f"distbp: error: {e}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    except OSError as e:
        if e.filename is None or (comm.size > 1 and not getattr(e, "agreed", False)):
            raise  # not about a named file, or one rank's: abort all with the report
        if comm.is_root:
            print(f"distbp: error: {e.filename2 or e.filename}: {e.strerror}; HINT: give a path to a readable "
                  "input or a writable output (not a directory)", file=sys.stderr, flush=True)
        return EXIT_USAGE


class QuietPipe:
    """A stdout/stderr that drops further output once its reader is gone (`distbp ... | head`)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            return self._drop(len(text))

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._drop(0)

    def _drop(self, result: int) -> int:
        """Point the stream's file descriptor at /dev/null; the command goes on silently."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())
        os.close(devnull)
        return result

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse; unknown arguments are reported with the usage of the (sub)command they were given to."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        for dest in ("command", "data_command", "ckpt_command"):  # down to the innermost subcommand
            sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
            if sub is None or getattr(args, dest, None) not in sub.choices:
                break
            parser = sub.choices[getattr(args, dest)]
        parser.error_unknown(extras)
    return args


def parse_args(argv: list[str] | None, comm) -> argparse.Namespace:
    """The parsed command line; usage errors, --help and --version print on rank 0 only."""
    if comm.is_root:
        return _parse(argv)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        return _parse(argv)  # every rank exits alike, the others silently


def main(argv: list[str] | None = None) -> int:
    """Entry point of the distbp console script and python -m distbp."""
    from .parallel import startup
    # Before MPI is up nothing of MPI can watch the ranks: a watcher process keeps the deadline
    # (the default stall timeout) until the stall watchdog is running.
    timeout = startup.default_timeout(os.environ)
    deadline = startup.Deadline(timeout)
    from .parallel import faults
    from .parallel.comm import world
    from .parallel.guard import install_abort_on_error, run_guarded
    from .parallel.watchdog import watching
    sys.stdout, sys.stderr = QuietPipe(sys.stdout), QuietPipe(sys.stderr)
    if startup.launched(os.environ) and startup.launcher_rank(os.environ) == 0:
        startup.write_past_the_launcher()
    try:
        faults.inject_at(startup.launcher_rank(os.environ), "startup")  # inert unless DISTBP_FAULT is set
        comm = world()
    except UserError as e:
        print(f"distbp: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    deadline.phase(1)
    faults.inject_at(comm.rank, "mpi")
    args = parse_args(argv, comm)
    install_abort_on_error(comm)
    # Every collective of every command is watched: a rank frozen anywhere ends the job with its
    # name (train.stall_timeout once the command knows the run's config, the default until then).
    # In data, ckpt and plot the other ranks wait while rank 0 works alone: a rank that answers is alive.
    strict = args.command in ("train", "eval", "predict", "lr-find")
    with watching(comm, timeout, args.command, strict) as comm:
        deadline.disarm()
        faults.inject_at(comm.rank, "command")
        code = run_guarded(dispatch, comm, args, comm)
        comm.barrier()  # no rank exits while another is frozen short of the end
    return code
