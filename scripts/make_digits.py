"""Write distbp/datasets/digits.h5: scikit-learn's 8x8 digits as a distbp dataset (needs scikit-learn)."""
import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from distbp.datasets.dataset import Dataset, write_dataset

ATTRS = {
    "source": "UCI ML Optical Recognition of Handwritten Digits (optdigits), the 1797-image test set "
              "as distributed by scikit-learn (sklearn.datasets.load_digits); 8x8 images of pixel counts 0..16",
    "license": "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/)",
    "attribution": "E. Alpaydin and C. Kaynak (1998). Optical Recognition of Handwritten Digits. "
                   "UCI Machine Learning Repository. https://doi.org/10.24432/C50P49",
    "url": "https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
    "split": "stratified train/val split, 360 val rows, random_state=0 (scripts/make_digits.py)",
}


def main():
    """Load the digits, split them with a fixed seed, write the HDF5 file and print its summary."""
    default = Path(__file__).resolve().parents[1] / "distbp" / "datasets" / "digits.h5"
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?", type=Path, default=default)
    args = parser.parse_args()
    digits = load_digits()
    x = digits.data.astype(np.uint8)  # (1797, 64) pixel counts 0..16, exact in uint8
    y = digits.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=360, stratify=y, random_state=0)
    write_dataset(args.out, {"train": (x_train, y_train), "val": (x_val, y_val)}, task="classification",
                  num_classes=10, x_scale=1 / 16, attrs=ATTRS)
    with Dataset(args.out) as ds:
        print("\n".join(ds.describe()))


if __name__ == "__main__":
    main()
