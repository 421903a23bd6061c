"""Text to token datasets (`distbp data text FILE OUT --context T`) and the vocabulary that decodes them.

Characters (UTF-8 code points) or bytes become ids; the vocabulary is stored in the dataset's root
attributes (``tokenizer``, ``vocabulary``: a JSON list of the characters in id order) so generate and
predict decode with it. The text is cut once: the first part is the training text, the contiguous tail
the validation text, and each is cut into windows of T + 1 tokens on its own (x = window[:-1],
y = window[1:], windows every ``stride`` tokens), so no validation window overlaps the training text.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files.safeio import check_output
from .dataset import write_dataset

LEVELS = ("char", "byte")
ID_DTYPES = {"uint8": 1 << 8, "uint16": 1 << 16, "int32": 1 << 31}  # dtype: how many ids it holds


class TextError(UserError):
    """A text input that cannot become a token dataset; the message names the file and the fix."""


class Vocabulary:
    """Ids <-> text: characters in id order (char level) or the 256 byte values (byte level)."""

    def __init__(self, tokenizer: str, chars: list[str] | None = None):
        self.tokenizer, self.chars = tokenizer, chars
        self.size = 256 if tokenizer == "byte" else len(chars)
        self.index = {c: i for i, c in enumerate(chars or [])}

    @classmethod
    def from_attrs(cls, attrs: dict, where: str) -> Vocabulary:
        """The vocabulary stored in a dataset's root attributes; UserError naming where if there is none."""
        tokenizer = attrs.get("tokenizer")
        if tokenizer == "byte":
            return cls("byte")
        try:
            chars = json.loads(attrs.get("vocabulary") or "null")
        except (TypeError, ValueError):
            chars = None
        if tokenizer != "char" or not isinstance(chars, list):
            raise UserError(f"{where}: no vocabulary (root attributes tokenizer and vocabulary); HINT: make the "
                            "dataset with `distbp data text`")
        return cls("char", [str(c) for c in chars])

    def attrs(self) -> dict:
        """Root attributes that store this vocabulary."""
        out = {"tokenizer": self.tokenizer, "vocab_size": self.size}
        return out | ({"vocabulary": json.dumps(self.chars, ensure_ascii=False)} if self.chars is not None else {})

    def encode(self, text: str) -> np.ndarray:
        """Ids of a text; UserError naming the first character the vocabulary lacks."""
        if self.tokenizer == "byte":
            return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64)
        missing = next((c for c in text if c not in self.index), None)
        if missing is not None:
            raise UserError(f"the character {missing!r} of the prompt is not in the model's vocabulary of "
                            f"{self.size} characters; HINT: use only characters of the training text")
        return np.array([self.index[c] for c in text], dtype=np.int64)

    def decode(self, ids) -> str:
        """The text of ids (bytes that are not valid UTF-8 become U+FFFD)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.tokenizer == "byte":
            return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        return "".join(self.chars[i] for i in ids)


def read_tokens(path: Path, level: str) -> tuple[np.ndarray, Vocabulary]:
    """(ids (n,) int64, vocabulary) of a text file; TextError naming the file for what cannot be read."""
    if not path.is_file():
        raise TextError(f"{path}: no such file; HINT: give the path of a text file")
    raw = path.read_bytes()
    if not raw:
        raise TextError(f"{path}: the file is empty; HINT: give a text file with at least a few thousand characters")
    if level == "byte":
        return np.frombuffer(raw, np.uint8).astype(np.int64), Vocabulary("byte")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextError(f"{path}: not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); HINT: convert it "
                        "(iconv -f LATIN1 -t UTF-8 FILE > FILE.utf8) or use --level byte") from None
    chars = sorted(set(text))
    vocab = Vocabulary("char", chars)
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)  # one code point per entry
    table = np.array([ord(c) for c in chars], np.uint32)
    return np.searchsorted(table, codes).astype(np.int64), vocab


def id_dtype(path: Path, vocab: Vocabulary, dtype: str) -> np.dtype:
    """The dtype ids are stored in: the one asked for, or (auto) the smallest that holds the vocabulary."""
    if dtype == "auto":
        return np.dtype(next(d for d, n in ID_DTYPES.items() if vocab.size <= n))
    if vocab.size > ID_DTYPES[dtype]:
        unit = "characters" if vocab.tokenizer == "char" else "byte values"
        bigger = next(d for d, n in ID_DTYPES.items() if vocab.size <= n)
        raise TextError(f"{path}: {vocab.size} distinct {unit} do not fit {dtype} ids (at most "
                        f"{ID_DTYPES[dtype]}); HINT: use --dtype {bigger} or --dtype auto")
    return np.dtype(dtype)


def windows(ids: np.ndarray, T: int, stride: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) (N, T) from windows of T + 1 tokens starting every stride tokens; y is x shifted by one."""
    starts = np.arange(0, len(ids) - T, stride)
    idx = starts[:, None] + np.arange(T + 1)              # (N, T + 1)
    w = ids[idx].astype(dtype)
    return w[:, :-1], w[:, 1:]


def cut(path: Path, n: int, T: int, val_fraction: float, unit: str) -> int:
    """Where the validation tail starts; TextError when either part holds less than one window of T + 1."""
    val = int(round(n * val_fraction))
    start = n - val
    need = T + 1
    if start < need or (val_fraction > 0 and val < need):
        least = need if val_fraction == 0 else int(np.ceil(need / min(val_fraction, 1 - val_fraction)))
        raise TextError(f"{path}: {n} {unit} is shorter than one context of --context {T} in the train part "
                        f"and the val tail ({val_fraction:g}); HINT: use --context {max(1, min(n // 20, T // 2))} "
                        f"or less, or a text of at least {least} {unit}")
    return start


def text_dataset(path, out, context: int, level: str = "char", val_fraction: float = 0.1,
                 stride: int | None = None, dtype: str = "auto", force: bool = False, about: dict | None = None) -> Path:
    """Write the token dataset of a text file; every check runs before anything is written."""
    path, out = Path(path), Path(out)
    if level not in LEVELS:
        raise TextError(f"--level {level!r} is not one of {', '.join(LEVELS)}")
    if context < 1 or not 0 <= val_fraction < 1 or (stride is not None and stride < 1):
        raise TextError(f"{path}: --context {context}, --stride {stride}, --val-fraction {val_fraction}: need "
                        "context >= 1, stride >= 1 and 0 <= val fraction < 1; HINT: e.g. --context 128")
    check_output(out, [path], force)
    ids, vocab = read_tokens(path, level)
    dt = id_dtype(path, vocab, dtype)
    unit = "characters" if level == "char" else "bytes"
    start = cut(path, len(ids), context, val_fraction, unit)
    stride = stride or context
    splits = {"train": windows(ids[:start], context, stride, dt)}
    if val_fraction > 0:
        splits["val"] = windows(ids[start:], context, stride, dt)
    attrs = {**vocab.attrs(), "context": context, "stride": stride, "source": path.name,
             "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
             "split": f"val: the last {len(ids) - start} of {len(ids)} {unit} (a contiguous tail), "
                      f"train: the {start} before it; windows of {context + 1} every {stride}",
             **(about or {})}  # a fetched text's source, url and license say more than its file name
    return write_dataset(out, splits, task="sequence", attrs=attrs)
