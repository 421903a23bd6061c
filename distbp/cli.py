"""Command line: distbp train | eval | data | ckpt (see DESIGN.md)."""
from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback

from . import __version__
from .errors import EXIT_NONFINITE, EXIT_USAGE, NonFiniteError, UserError

EPILOG_TRAIN = """examples:
  distbp train                                  the default MLP on the shipped digits
  mpirun -n 8 distbp train digits --set train.epochs=50
  distbp train my.toml --set optim.lr=0.01 --run-dir runs/a --resume never
exit codes: 0 done, 2 bad input, 3 non-finite loss, 75 stopped by a signal (resumable)"""


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    p = argparse.ArgumentParser(prog="distbp", description="Data-parallel backprop on CPUs with MPI and HDF5.")
    p.add_argument("--version", action="version", version=f"distbp {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (under mpirun/srun: data-parallel)",
                       epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", nargs="?", help="config TOML file or shipped name (digits, digits-cnn, ...)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=5 (repeatable)")
    t.add_argument("--run-dir", help="run directory (default runs/<timestamp>)")
    t.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                   help="auto: newest valid checkpoint in the run dir (default); never; or a file")

    e = sub.add_parser("eval", help="loss and accuracy of a checkpoint on a split")
    e.add_argument("checkpoint")
    e.add_argument("--data", help="dataset file (default: the one the run trained on)")
    e.add_argument("--split", default="val", help="split to evaluate (val, test, train)")

    d = sub.add_parser("data", help="make, convert and inspect dataset files")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    dg = dsub.add_parser("digits", help="write the shipped 8x8 digits dataset to a file")
    dg.add_argument("out")
    ds = dsub.add_parser("synthetic", help="write a learnable synthetic classification dataset")
    ds.add_argument("out")
    ds.add_argument("--rows", type=int, default=10000)
    ds.add_argument("--features", type=int, default=32)
    ds.add_argument("--classes", type=int, default=10)
    ds.add_argument("--val-fraction", type=float, default=0.2)
    ds.add_argument("--seed", type=int, default=0)
    di = dsub.add_parser("inspect", help="splits, shapes, dtypes, class balance, value ranges")
    di.add_argument("file")

    c = sub.add_parser("ckpt", help="inspect, verify and export checkpoints")
    csub = c.add_subparsers(dest="ckpt_command", required=True, metavar="ACTION")
    ci = csub.add_parser("inspect", help="step, epoch, config, shapes and sizes")
    ci.add_argument("file")
    cv = csub.add_parser("verify", help="check the checksum (exit 0 valid, 1 damaged)")
    cv.add_argument("file")
    ce = csub.add_parser("export", help="parameters as a plain .npz")
    ce.add_argument("file")
    ce.add_argument("out")
    return p


def cmd_train(args, comm) -> int:
    """distbp train."""
    from .config import load_config
    from .errors import agree
    from .train import run
    cfg = agree(comm, load_config, args.config, args.overrides)
    run_dir = args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    return run(cfg, comm, run_dir, args.resume)


def cmd_eval(args, comm) -> int:
    """distbp eval."""
    from .evaluate import evaluate_checkpoint
    result = evaluate_checkpoint(args.checkpoint, comm, data_path=args.data, split=args.split)
    if comm.is_root:
        print(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0


def cmd_data(args, comm) -> int:
    """distbp data digits | synthetic | inspect."""
    from . import data
    if args.data_command == "inspect":
        with data.Dataset(args.file) as ds:
            print("\n".join(ds.describe()))
        return 0
    if args.data_command == "digits":
        shutil.copyfile(data.digits_path(), args.out)
    elif args.data_command == "synthetic":
        x, y = data.synthetic(args.rows, args.features, args.classes, args.seed)
        n_val = int(round(args.rows * args.val_fraction))
        data.write_dataset(args.out, {"train": (x[n_val:], y[n_val:]), "val": (x[:n_val], y[:n_val])},
                           task="classification", num_classes=args.classes,
                           attrs={"source": f"distbp data synthetic --seed {args.seed}"})
    print(f"wrote {args.out}")
    return 0


def cmd_ckpt(args, comm) -> int:
    """distbp ckpt inspect | verify | export."""
    from . import checkpoint as ckpt
    if args.ckpt_command == "verify":
        try:
            ck = ckpt.load(args.file)
        except ckpt.CheckpointError as e:
            print(f"INVALID: {e}")
            return 1
        print(f"OK: {args.file} step {ck.attrs['step']} checksum {ck.attrs['checksum']}")
        return 0
    ck = ckpt.load(args.file)
    if args.ckpt_command == "inspect":
        print("\n".join(ckpt.describe(ck)))
    else:
        import numpy as np
        np.savez(args.out, **ck.params)
        print(f"wrote {len(ck.params)} arrays to {args.out}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "data": cmd_data, "ckpt": cmd_ckpt}


def dispatch(args, comm) -> int:
    """Run one subcommand; input errors become one message from rank 0 and an exit code."""
    try:
        return COMMANDS[args.command](args, comm)
    except UserError as e:
        if comm.is_root:
            if args.debug:
                traceback.print_exc()
            print(f"distbp: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except NonFiniteError as e:
        if comm.is_root:
            print(f"distbp: error: {e}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE


def main(argv: list[str] | None = None) -> int:
    """Entry point of the distbp console script and python -m distbp."""
    args = build_parser().parse_args(argv)
    from .comm import install_abort_on_error, run_guarded, world
    try:
        comm = world()
    except UserError as e:
        print(f"distbp: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    install_abort_on_error(comm)
    return run_guarded(dispatch, comm, args, comm)
