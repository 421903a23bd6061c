"""Text in and text out: `distbp data text` (vocabulary, val tail, bad input), the shipped text, generate."""
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import distbp
from conftest import run_distbp
from distbp.cli import main
from distbp.config import load_config
from distbp.datasets.dataset import Dataset, DataError, write_dataset
from distbp.datasets.task import Sequence, TaskError
from distbp.datasets.text import Vocabulary, text_dataset
from distbp.inference.generate import next_token
from distbp.parallel.comm import SerialComm
from distbp.training.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "data" / "shakespeare.txt").read_text()[:6000]


def test_char_dataset_stores_its_vocabulary_and_a_contiguous_val_tail(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    path = text_dataset(tmp_path / "t.txt", tmp_path / "t.h5", 32, val_fraction=0.2)
    with Dataset(path) as ds:
        vocab = Vocabulary.from_attrs(ds.attrs, str(path))
        train, val = (ds.split(s).read(np.arange(ds.split(s).n)) for s in ("train", "val"))
        assert ds.task.name == "sequence" and ds.output_dim == len(set(TEXT)) == vocab.size
    start = len(TEXT) - round(0.2 * len(TEXT))
    assert vocab.decode(train[0][0]) == TEXT[:32] and vocab.decode(train[1][0]) == TEXT[1:33]
    assert vocab.decode(val[0][0]) == TEXT[start:start + 32]  # the val windows start after the train text
    assert (train[0].size + 32) < start + 33 and vocab.decode(val[1][-1]) in TEXT[start:]


def test_byte_dataset_keeps_any_bytes(tmp_path):
    raw = "héllo wörld ".encode() * 40 + b"\xff\xfe"
    (tmp_path / "b.txt").write_bytes(raw)
    path = text_dataset(tmp_path / "b.txt", tmp_path / "b.h5", 16, level="byte")
    with Dataset(path) as ds:
        x, _ = ds.split("train").read(np.arange(1))
        assert ds.output_dim == 256 and bytes(x[0].astype(np.uint8)) == raw[:16]


def test_the_shipped_dataset_is_the_shipped_text_made_again(tmp_path):
    cfg = load_config("char-transformer")
    with Dataset(ROOT / cfg.data.path) as ds:
        context = ds.input_shape[0]
        assert ds.attrs["source"] == "shakespeare.txt"
    out = text_dataset(ROOT / "data" / "shakespeare.txt", tmp_path / "s.h5", context)
    assert out.read_bytes() == (ROOT / cfg.data.path).read_bytes()


BAD = {  # (file bytes, extra arguments, words of the message)
    "not utf-8": (b"caf\xe9 " * 100, [], ["not UTF-8 (byte 3", "--level byte"]),
    "empty": (b"", [], ["the file is empty"]),
    "shorter than a context": (b"abc " * 10, [], ["shorter than one context of --context 32", "--context"]),
    "vocabulary above the dtype": ("".join(map(chr, range(0x100, 0x100 + 300))).encode() * 2, ["--dtype", "uint8"],
                                   ["300 distinct characters do not fit uint8", "--dtype uint16"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_text_exits_2_with_one_message_naming_the_file_and_writes_nothing(case, tmp_path, capsys):
    raw, extra, words = BAD[case]
    (tmp_path / "in.txt").write_bytes(raw)
    code = main(["data", "text", str(tmp_path / "in.txt"), str(tmp_path / "out.h5"), "--context", "32", *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("distbp: error: "), lines
    assert str(tmp_path / "in.txt") in lines[0] and all(w in lines[0] for w in words), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_a_dataset_id_outside_the_vocabulary_is_named_with_the_file(tmp_path):
    x = np.zeros((4, 8), np.uint8)
    x[2, 5] = 9
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.attrs.update({"distbp_format": "dataset", "version": 1, "task": "sequence", "vocab_size": 9})
        for s in ("train", "val"):
            f[f"{s}/x"], f[f"{s}/y"] = x, np.zeros_like(x)
    with pytest.raises(DataError, match=r"d.h5, split 'train', x: token id 9 at row 2, position 5 is outside \[0, 9\)"):
        Dataset(tmp_path / "d.h5").split("train")
    with pytest.raises(DataError, match="token id 9"):
        write_dataset(tmp_path / "w.h5", {"train": (x, x)}, task="sequence", attrs={"vocab_size": 9})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny sequence model's run directory after a few steps on the excerpt."""
    folder = tmp_path_factory.mktemp("gen")
    (folder / "t.txt").write_text(TEXT)
    path = text_dataset(folder / "t.txt", folder / "t.h5", 16)
    cfg = load_config("char-transformer", [f'data.path="{path}"', "train.max_steps=3", "optim.warmup_steps=0",
                                           'model.layers=[{type="embedding", dim=16}, {type="position_embedding"}, '
                                           '{type="transformer_block", heads=2}, {type="tied_output"}]'])
    assert Trainer(cfg, SerialComm(), folder / "run", "never").train() == 0
    return folder / "run"


def test_generate_prints_text_and_the_same_seed_gives_the_same_text(trained):
    r = run_distbp(["generate", trained, "--prompt", "First", "--tokens", "40", "--top-k", "5", "--temperature",
                    "0.8", "--seed", "1"])
    assert r.returncode == 0 and r.stdout.startswith("First") and len(r.stdout) == len("First") + 41, r.stderr
    model = distbp.load(trained)
    again = model.generate("First", 40, temperature=0.8, top_k=5, seed=1)
    assert again + "\n" == r.stdout != model.generate("First", 40, temperature=0.8, top_k=5, seed=2) + "\n"


def test_generate_refuses_characters_outside_the_vocabulary_and_bad_options(trained, capsys):
    assert main(["generate", str(trained), "--prompt", "~~", "--tokens", "5"]) == 2
    assert "'~' of the prompt is not in the model's vocabulary" in capsys.readouterr().err
    assert main(["generate", str(trained), "--tokens", "5", "--top-k", "0"]) == 2
    assert "--top-k 0 must be >= 1" in capsys.readouterr().err


def test_next_token_top_k_and_temperature():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 5.0, 4.0, -1.0])
    assert next_token(logits, 0, None, rng) == 1
    draws = {next_token(logits, 1.0, 2, rng) for _ in range(200)}
    assert draws == {1, 2}


def test_generate_needs_a_sequence_model(tmp_path, capsys):
    cfg = load_config(None, ["train.max_steps=1"])
    assert Trainer(cfg, SerialComm(), tmp_path / "run", "never").train() == 0
    assert main(["generate", str(tmp_path / "run"), "--tokens", "5"]) == 2
    assert "classification model cannot generate text" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs a sequence model"):
        distbp.load(tmp_path / "run").generate("a", 3)
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["summary"]


def test_predict_writes_next_tokens_and_the_vocabulary(trained, tmp_path, capsys):
    data = load_config(str(trained / "config.toml")).data.path
    assert main(["predict", str(trained), data, str(tmp_path / "p.h5"), "--split", "val"]) == 0
    with h5py.File(tmp_path / "p.h5", "r") as f, Dataset(data) as ds:
        assert f["token"].shape == f["y"].shape == (ds.split("val").n, 16)
        assert f.attrs["tokenizer"] == "char" and json.loads(f.attrs["vocabulary"]) == json.loads(ds.attrs["vocabulary"])
        x = ds.split("val").read(np.arange(2))[0]
        assert np.array_equal(distbp.load(trained).predict(x), f["token"][:2])


def test_a_sequence_file_needs_its_vocab_size_and_is_never_converted(tmp_path):
    x = np.zeros((4, 8), np.uint8)
    with pytest.raises(DataError, match="root attribute vocab_size=None must be a positive integer"):
        write_dataset(tmp_path / "w.h5", {"train": (x, x)}, task="sequence")
    with pytest.raises(TaskError, match="distbp data text"):
        Sequence(5).convert_targets(np.zeros(3))


def test_data_inspect_shows_a_token_dataset(capsys):
    assert main(["data", "inspect", str(ROOT / "data" / "shakespeare.h5")]) == 0
    out = capsys.readouterr().out
    assert "task sequence, input (64,), output 62" in out and "x range [0, 61]" in out


def test_fetch_tinyshakespeare_converts_the_verified_file(tmp_path):
    import hashlib
    from dataclasses import replace
    from distbp.datasets import fetch as fe
    text = TEXT.encode()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "input.txt").write_bytes(text)
    recipe = fe.CATALOG["tinyshakespeare"]
    remote = replace(recipe.files[0], size=len(text), sha256=hashlib.sha256(text).hexdigest())
    out = fe.fetch("tinyshakespeare", tmp_path / "data", source=tmp_path / "src",
                   catalog={"tinyshakespeare": replace(recipe, files=(remote,))})
    with Dataset(out) as ds:
        assert ds.task.name == "sequence" and ds.input_shape == (64,) and "Tiny Shakespeare" in ds.attrs["source"]
    assert recipe.files[0].size == 1115394 and recipe.files[0].sha256.startswith("86c4e6aa")
