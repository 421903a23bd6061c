"""data convert's column choice: --columns/--drop, pandas' index column, text feature columns named as such, and
feature names kept in the dataset and shown by inspect."""
import json

import h5py
import numpy as np
import pytest

from distbp import cli
from distbp.datasets.convert import ConvertError, convert

ROWS = [(5.1, 3.5, 0, "setosa"), (7.0, 3.2, 1, "versicolor"), (6.3, 3.3, 2, "virginica"),
        (4.9, 3.0, 0, "setosa"), (6.4, 3.2, 1, "versicolor"), (5.8, 2.7, 2, "virginica")]


def write_csv(path, index: bool = False, note: bool = False) -> str:
    """A small iris-like table, with pandas' unnamed index column and a text column if asked."""
    head = ["sepal", "width", "code", "species"] + ["note"] * note
    lines = [("," if index else "") + ",".join(head)]
    lines += [(f"{i}," if index else "") + ",".join(map(str, r)) + (",some text" if note else "")
              for i, r in enumerate(ROWS)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def features(path) -> tuple[list[str], np.ndarray]:
    """(feature names, train x) of a dataset file."""
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["feature_names"]), np.concatenate([f["train/x"][()], f["val/x"][()]])


def test_columns_and_drop_by_name_or_index(tmp_path):
    src = write_csv(tmp_path / "t.csv")
    convert([src], tmp_path / "a.h5", label="species", drop=["code"], val_fraction=0.5)
    names, x = features(tmp_path / "a.h5")
    assert names == ["sepal", "width"] and x.shape == (6, 2)
    convert([src], tmp_path / "b.h5", label="species", columns=["width", "0"], val_fraction=0.5)
    names, x = features(tmp_path / "b.h5")
    assert names == ["width", "sepal"] and sorted(x[:, 1]) == sorted(r[0] for r in ROWS)
    with pytest.raises(ConvertError, match="--columns names the label column 'species'"):
        convert([src], tmp_path / "c.h5", label="species", columns=["species"])
    with pytest.raises(ConvertError, match="no column named 'petal' in --drop"):
        convert([src], tmp_path / "c.h5", label="species", drop=["petal"])


def test_pandas_index_column_is_left_out_with_a_warning(tmp_path):
    src, notes = write_csv(tmp_path / "pd.csv", index=True), []
    convert([src], tmp_path / "a.h5", label="species", val_fraction=0.5, log=notes.append)
    assert len(notes) == 1 and "unnamed and counts 0..5: the row index pandas' to_csv() writes" in notes[0]
    assert features(tmp_path / "a.h5")[0] == ["sepal", "width", "code"]
    convert([src], tmp_path / "b.h5", label="species", val_fraction=0.5, columns=["0", "sepal"], log=notes.append)
    assert len(notes) == 1 and features(tmp_path / "b.h5")[1].shape == (6, 2)  # --columns: as chosen


def test_a_text_feature_column_is_named_and_inspect_shows_feature_names(tmp_path, capsys):
    src = write_csv(tmp_path / "n.csv", note=True)
    with pytest.raises(ConvertError, match=r"feature 'note' \(column 4\) holds text \('some text'\); HINT: if the "
                                           r"whole column is text, leave it out \(--drop note\)"):
        convert([src], tmp_path / "a.h5", label="species")
    assert cli.main(["data", "convert", src, str(tmp_path / "a.h5"), "--label", "species", "--drop", "note,code",
                     "--val-fraction", "0.5"]) == 0
    assert cli.main(["data", "inspect", str(tmp_path / "a.h5")]) == 0
    assert 'feature_names = ["sepal", "width"]' in capsys.readouterr().out


def test_predictions_give_the_class_names(tmp_path, capsys):
    import distbp
    src = write_csv(tmp_path / "t.csv")
    data = tmp_path / "t.h5"
    convert([src], data, label="species", drop=["code"], val_fraction=0.5)
    assert cli.main(["train", "--set", f"data.path='{data}'", "--set", "train.epochs=2", "--run-dir",
                     str(tmp_path / "run"), "--progress", "none"]) == 0
    model = distbp.load(tmp_path / "run")
    assert model.class_names == ["setosa", "versicolor", "virginica"]
    assert set(model.predict(np.array([[5.1, 3.5], [7.0, 3.2]]))) <= set(model.class_names)
    out = tmp_path / "p.csv"
    assert cli.main(["predict", str(tmp_path / "run"), str(data), str(out)]) == 0
    head, first = out.read_text().splitlines()[:2]
    assert head.split(",")[:2] == ["class", "class_name"]
    assert first.split(",")[1] == model.class_names[int(first.split(",")[0])]
