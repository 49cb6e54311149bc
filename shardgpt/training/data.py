"""Tasks (minGPT's sort, char-level text, nanoGPT's train.bin) and deterministic global batches over `dp`.

Row r of the batch for step i depends only on (seed, i, r), so every process (and every strategy) sees
the same data, and each process builds only the rows its own devices hold.

Every task has two disjoint splits, "train" and "val" (held out): sort problems are split by a hash of
their digits (as minGPT's sort dataset does), text by position (the last 10%, as nanoGPT's prepare
scripts do), nanoGPT's data by file (train.bin, val.bin).
"""

import dataclasses
import hashlib
import pathlib
import pickle

import jax
import numpy as np
from jax.sharding import NamedSharding

from shardgpt.parallel.sharding import axes_size

IGNORE_INDEX = -1  # targets with this value carry no loss
SPLITS = ("train", "val")
VAL_FRACTION = 0.1  # of a text file, held out at its end


def _checked(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return split


def _rng(seed: int, step: int, row: int, split: str) -> np.random.Generator:
    """The generator of one row; the val split draws from its own streams."""
    return np.random.default_rng([seed, step, row] + ([1] if _checked(split) == "val" else []))


def _windows(
    tokens: np.ndarray, seq_len: int, seed: int, step: int, rows: range, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets (int32) of one seq_len + 1 window per row, at the row generator's random offset."""
    starts = [_rng(seed, step, r, split).integers(0, len(tokens) - seq_len) for r in rows]
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


@dataclasses.dataclass(frozen=True)
class SortTask:
    """minGPT's sort: read `length` digits in [0, num_digits), then emit them sorted.

    The sequence is input + output minus its last token; loss is only on the sorted half.
    """

    length: int = 6
    num_digits: int = 3
    seed: int = 0

    @property
    def vocab_size(self) -> int:
        return self.num_digits

    @property
    def seq_len(self) -> int:
        return 2 * self.length - 1

    def problem(self, step: int, row: int, split: str = "train") -> np.ndarray:
        """The `length` unsorted digits of one example, drawn until it belongs to `split`."""
        rng = _rng(self.seed, step, row, split)
        while True:
            digits = rng.integers(0, self.num_digits, self.length)
            if self.split_of(digits) == split:
                return digits

    @staticmethod
    def split_of(digits: np.ndarray) -> str:
        """A quarter of all problems are held out, chosen by a hash that is the same in every process."""
        digest = hashlib.blake2b(np.asarray(digits, np.int64).tobytes(), digest_size=2).digest()
        return "val" if int.from_bytes(digest, "little") % 4 == 0 else "train"

    def rows(self, step: int, rows: range, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets, int32 (len(rows), seq_len), for these rows of step `step`'s batch."""
        x = np.empty((len(rows), self.seq_len), np.int32)
        y = np.empty((len(rows), self.seq_len), np.int32)
        for i, row in enumerate(rows):
            digits = self.problem(step, row, split)
            cat = np.concatenate([digits, np.sort(digits)])
            x[i], y[i] = cat[:-1], cat[1:]
        y[:, : self.length - 1] = IGNORE_INDEX  # predicting the unsorted input is not the task
        return x, y


@dataclasses.dataclass(frozen=True)
class CharTask:
    """Character-level language modelling over a local text file; windows at seeded random offsets.

    The first 90% of the text is the train split, the rest the val split.
    """

    path: str
    seq_len: int = 128
    seed: int = 0

    def __post_init__(self):
        text = _read_text(self.path)
        val = int(len(text) * VAL_FRACTION)
        if min(len(text) - val, val) < self.seq_len + 1:
            raise ValueError(
                f"{self.path} has {len(text)} characters; its held-out last {VAL_FRACTION:.0%} needs "
                f"more than seq_len={self.seq_len}: use a file of at least {(self.seq_len + 1) * 10} "
                "characters or a smaller --seq"
            )
        chars = sorted(set(text))
        object.__setattr__(self, "chars", "".join(chars))
        lookup = {c: i for i, c in enumerate(chars)}
        ids = np.fromiter((lookup[c] for c in text), np.int32, len(text))
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "splits", {"train": ids[: len(ids) - val], "val": ids[len(ids) - val :]})

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Characters -> ids; raises on a character the file never contains."""
        unknown = sorted(set(text) - set(self.chars))
        if unknown:
            raise ValueError(
                f"characters {unknown!r} do not occur in {self.path}; the model cannot read them"
            )
        return np.array([self.chars.index(c) for c in text], np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in np.asarray(ids).tolist())

    def rows(self, step: int, rows: range, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        return _windows(self.splits[_checked(split)], self.seq_len, self.seed, step, rows, split)


GPT2_VOCAB = 50257  # nanoGPT's prepare.py scripts write GPT-2 BPE ids unless meta.pkl says otherwise


@dataclasses.dataclass(frozen=True)
class BinTask:
    """nanoGPT's prepared data: DIR/train.bin, a flat uint16 token memmap; windows at seeded random offsets.

    The files are memory-mapped, so a process reads only the windows of its own rows. The val split is
    DIR/val.bin, read only when asked for. The vocabulary size is DIR/meta.pkl's `vocab_size` (nanoGPT's
    char datasets) if present, else GPT-2's.
    """

    path: str
    seq_len: int = 128
    seed: int = 0

    def __post_init__(self):
        train = pathlib.Path(self.path) / "train.bin"
        if not train.is_file():
            raise ValueError(f"no {train}: give bin:DIR with nanoGPT's prepared train.bin (uint16 tokens)")
        vocab_size = _meta_vocab(pathlib.Path(self.path) / "meta.pkl")
        object.__setattr__(self, "vocab_size", vocab_size)
        object.__setattr__(self, "tokens", _open_tokens(train, self.seq_len, vocab_size))

    def rows(self, step: int, rows: range, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        tokens = self._val_tokens() if split == "val" else self.tokens
        return _windows(tokens, self.seq_len, self.seed, step, rows, split)

    def _val_tokens(self) -> np.ndarray:
        val = pathlib.Path(self.path) / "val.bin"
        if not val.is_file():
            raise ValueError(f"no {val}: held-out loss needs nanoGPT's val.bin beside train.bin")
        if not hasattr(self, "_val"):  # opened (and checked) once
            object.__setattr__(self, "_val", _open_tokens(val, self.seq_len, self.vocab_size))
        return self._val


CHECK_CHUNK = 1 << 24  # tokens per vectorised pass when checking a .bin file (32 MiB of uint16)


def _open_tokens(path: pathlib.Path, seq_len: int, vocab_size: int) -> np.ndarray:
    """A .bin file of uint16 tokens, memory-mapped, after checking all of it once: a whole number of
    tokens, enough for one window, every id inside the vocabulary (in chunks: a large file takes seconds,
    and a bad id is found before anything compiles, not at the step whose batch reads it)."""
    size = path.stat().st_size
    if size == 0 or size % 2:
        what = "is empty" if size == 0 else f"holds {size} bytes, not a whole number of uint16 tokens"
        raise ValueError(f"{path} {what}: the file is truncated or not nanoGPT's prepared .bin")
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"{path} has {len(tokens)} tokens; need more than seq_len={seq_len}: use a smaller --seq"
        )
    for start in range(0, len(tokens), CHECK_CHUNK):
        chunk = tokens[start : start + CHECK_CHUNK]
        if chunk.max() >= vocab_size:
            offset = start + int(np.argmax(chunk >= vocab_size))
            raise ValueError(
                f"{path}: token id {int(tokens[offset])} at offset {offset} (token index) is outside the "
                f"vocabulary [0, {vocab_size}) (meta.pkl's vocab_size, else GPT-2's): re-encode the data, or "
                "give the meta.pkl it was encoded with"
            )
    return tokens


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # meta.pkl holds dicts, strings and ints: nothing to import
        raise ValueError(f"meta.pkl refers to {module}.{name}; only plain data is read")


def _meta_vocab(path: pathlib.Path) -> int:
    if not path.is_file():
        return GPT2_VOCAB
    with path.open("rb") as f:
        meta = _PlainUnpickler(f).load()
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int):
        raise ValueError(f"{path}: expected nanoGPT's meta.pkl, a dict with an int vocab_size")
    return meta["vocab_size"]


def _read_text(path: str) -> str:
    file = pathlib.Path(path)
    if not file.is_file():
        raise ValueError(f"text file {path!r} not found: give chars:PATH with an existing local file")
    return file.read_text(encoding="utf-8", errors="replace")


def make_task(spec: str, seq_len: int | None = None, seed: int = 0):
    """A task from its spec, "sort", "chars:PATH" or "bin:DIR"; `seq_len` applies to the last two."""
    if spec == "sort":
        return SortTask(seed=seed)
    if spec.startswith("chars:"):
        return CharTask(spec[len("chars:") :], seq_len or 128, seed)
    if spec.startswith("bin:"):
        return BinTask(spec[len("bin:") :], seq_len or 128, seed)
    raise ValueError(
        f"unknown task {spec!r}: use 'sort', 'chars:PATH' (a local text file) or 'bin:DIR' (nanoGPT's "
        "train.bin)"
    )


def global_batch(
    task,
    step: int,
    batch_size: int,
    sharding: NamedSharding,
    vocab_size: int | None = None,
    split: str = "train",
) -> dict[str, jax.Array]:
    """Step `step`'s batch of `split` as global arrays with `sharding`; each device's rows are built where
    it lives.

    With `vocab_size` (the model's), every row's ids are checked as they are built (see check_ids).
    """
    shards = axes_size(sharding.mesh, sharding.spec[0] if sharding.spec else None)  # dp x ep
    if batch_size % shards:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the {shards} shards of the batch (dp x ep): "
            f"choose a multiple of {shards}"
        )
    shape = (batch_size, task.seq_len)
    built: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def rows_for(index):  # index: the device's slice of the global shape; tp replicas reuse one build
        rows = range(*index[0].indices(batch_size))
        key = (rows.start, rows.stop)
        if key not in built:
            built[key] = task.rows(step, rows, split)
            if vocab_size is not None:
                check_ids(built[key][0], vocab_size, f"{type(task).__name__} inputs")
                check_ids(built[key][1], vocab_size, f"{type(task).__name__} targets", allow_ignore=True)
        return built[key]

    return {
        name: jax.make_array_from_callback(shape, sharding, lambda idx, k=k: rows_for(idx)[k])
        for k, name in enumerate(("inputs", "targets"))
    }


def check_ids(ids, vocab_size: int, what: str = "tokens", allow_ignore: bool = False):
    """Raise unless every id is in [0, vocab_size) (or IGNORE_INDEX, for targets when allowed).

    Out-of-range ids have no row in the embedding or the head: a plain gather clamps them and a
    vocab-parallel one gives zeros, so they would make the impls disagree in silence.
    """
    ids = np.asarray(ids)
    bad = (ids < 0) | (ids >= vocab_size)
    if allow_ignore:
        bad &= ids != IGNORE_INDEX
    if bad.any():
        allowed = f"[0, {vocab_size})" + (f" or {IGNORE_INDEX} (ignored)" if allow_ignore else "")
        raise ValueError(
            f"{what}: token ids outside {allowed}, e.g. {ids[bad].flat[0]}: "
            "encode the data with the model's vocabulary, or raise model.vocab_size"
        )
