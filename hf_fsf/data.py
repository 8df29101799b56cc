"""Corpora and datasets that need no download.

Three sources, all available offline:

- **Text** for causal language models, at the *byte* level: token ids are the UTF-8 bytes of the
  text, so the vocabulary is exactly 256 (``VOCAB_SIZE``) and no tokenizer has to be downloaded.
  The default corpus is the Python standard library's own source files (a few MB of real,
  structured text that every Python installation carries). Local text files and cached
  ``datasets`` datasets are encoded the same way.
- **scikit-learn's digits** (8×8 images, 10 classes, bundled with scikit-learn) as tensors.
- **A teacher stream**: fresh Gaussian inputs every step and targets from a fixed random teacher
  network plus label noise, so the MSE loss has a known floor (the noise variance) and the
  held-out set has exactly the training distribution.
"""

from __future__ import annotations

import glob
import math
import os
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.data import Dataset

VOCAB_SIZE = 256  # byte-level: token id = byte value
DOCUMENT_SEPARATOR = b"\n"  # inserted between documents (files, dataset rows)

# Directory names under the standard library that are not "the library's own source".
_TEXT_SUFFIXES = frozenset({".txt", ".md", ".py", ".json", ".jsonl", ".csv", ".rst", ".text"})
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


# --------------------------------------------------------------------------------------------
# Byte-level text
# --------------------------------------------------------------------------------------------


def encode(text: str) -> torch.Tensor:
    """Token ids of ``text`` in the byte-level vocabulary (its UTF-8 bytes), as a LongTensor."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids: torch.Tensor | Sequence[int]) -> str:
    """Inverse of :func:`encode`; byte sequences cut inside a UTF-8 character decode to U+FFFD."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return bytes(values).decode("utf-8", errors="replace")


class ByteBlockDataset(Dataset):
    """Consecutive, non-overlapping blocks of ``block_size`` bytes of a corpus.

    Item ``i`` is ``{"input_ids": x, "labels": x}`` with ``x`` the LongTensor of bytes
    ``[i * block_size, (i + 1) * block_size)`` (values in ``[0, 256)``). ``labels`` equals
    ``input_ids`` because Hugging Face causal LMs shift the labels by one position inside the
    model; a plain PyTorch loop must compare ``logits[:, :-1]`` with ``labels[:, 1:]`` itself.
    The tail shorter than one block is dropped.
    """

    def __init__(self, data: bytes, block_size: int):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}.")
        self.block_size = block_size
        # One uint8 buffer for the whole corpus; items are cheap views converted to long.
        self._bytes = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if data
            else torch.zeros(0, dtype=torch.uint8)
        )
        self._num_blocks = len(data) // block_size

    def __len__(self) -> int:
        return self._num_blocks

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += self._num_blocks
        if not 0 <= index < self._num_blocks:
            raise IndexError(f"block {index} out of range for {self._num_blocks} blocks.")
        start = index * self.block_size
        block = self._bytes[start : start + self.block_size].long()
        return {"input_ids": block, "labels": block.clone()}

    @property
    def num_bytes(self) -> int:
        """Bytes covered by the blocks (the dropped tail excluded)."""
        return self._num_blocks * self.block_size

    def to_bytes(self) -> bytes:
        """The text the blocks cover, e.g. to tokenize it with a real tokenizer (block_size=1 keeps it all)."""
        return self._bytes[: self.num_bytes].numpy().tobytes()


@dataclass
class TextSplits:
    """A byte-level corpus split into training and held-out text, and its block datasets."""

    train: ByteBlockDataset
    validation: ByteBlockDataset
    source: str  # human-readable description of where the text came from
    vocab_size: int = VOCAB_SIZE


def split_documents(
    documents: Iterable[bytes], validation_fraction: float = 0.1, max_bytes: int | None = None
) -> tuple[bytes, bytes]:
    """Concatenate documents into (train, validation) bytes, holding out whole documents.

    Documents are taken in order until ``max_bytes`` (the last one is cut); each goes to the
    validation side while the validation side holds less than ``validation_fraction`` of the bytes
    seen so far, so the split is deterministic and held out *by document*, never by random chunk
    (random chunks of the same file would leak into training). With a single document, its last
    ``validation_fraction`` of bytes is held out instead.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}.")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be positive (or None for no limit), got {max_bytes!r}.")
    kept: list[bytes] = []
    total = 0
    for doc in documents:
        if not doc:
            continue
        if max_bytes is not None and total + len(doc) > max_bytes:
            doc = doc[: max_bytes - total]
        kept.append(doc)
        total += len(doc)
        if max_bytes is not None and total >= max_bytes:
            break
    if len(kept) == 1:
        cut = len(kept[0]) - max(1, int(len(kept[0]) * validation_fraction))
        return kept[0][:cut], kept[0][cut:]
    train: list[bytes] = []
    valid: list[bytes] = []
    train_bytes = valid_bytes = 0
    for doc in kept:
        if valid_bytes < validation_fraction * (train_bytes + valid_bytes):
            valid.append(doc)
            valid_bytes += len(doc)
        else:
            train.append(doc)
            train_bytes += len(doc)
    return DOCUMENT_SEPARATOR.join(train), DOCUMENT_SEPARATOR.join(valid)


@lru_cache(maxsize=4)
def stdlib_files(root: str | None = None) -> tuple[Path, ...]:
    """The standard library's ``.py`` files, in a deterministic order (sorted by relative path).

    ``root`` defaults to ``sysconfig.get_paths()["stdlib"]``. Test suites (``test/``, ``tests/``,
    ``idle_test/``), installed packages (``site-packages/``), caches and hidden directories are
    skipped: the corpus is the library's own source. The order, hence the corpus, depends on the
    Python version only.
    """
    base = Path(root or sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"standard library directory {base} not found; pass root= explicitly.")
    found: list[Path] = []
    for directory, subdirs, files in os.walk(base):
        subdirs[:] = sorted(
            d for d in subdirs if d not in _STDLIB_SKIP_DIRS and not d.startswith((".", "config-"))
        )
        found.extend(Path(directory, f) for f in files if f.endswith(".py"))
    return tuple(sorted(found, key=lambda p: p.relative_to(base).as_posix()))


def stdlib_corpus(
    max_bytes: int | None = 4_000_000, validation_fraction: float = 0.1, root: str | None = None
) -> tuple[bytes, bytes]:
    """(train, validation) bytes of the standard library's source, held out by file.

    ``max_bytes`` bounds the total (about 12 MB without a bound on CPython 3.11); files are read
    lazily, so a small corpus is fast to build.
    """

    documents = (path.read_bytes() for path in stdlib_files(root))  # lazy: stops at max_bytes
    return split_documents(documents, validation_fraction, max_bytes)


def _local_text_files(spec: str | Sequence[str]) -> list[Path] | None:
    """Files named by ``spec`` (paths, directories, glob patterns); None if it names none locally."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    files: list[Path] = []
    for item in specs:
        item = os.path.expanduser(str(item))
        if any(ch in item for ch in "*?["):
            files.extend(Path(p) for p in sorted(glob.glob(item, recursive=True)) if Path(p).is_file())
        elif Path(item).is_dir():
            below = (p for p in Path(item).rglob("*") if p.is_file())
            visible = (
                p for p in below if not any(part.startswith(".") for part in p.relative_to(item).parts)
            )
            files.extend(sorted(visible, key=lambda p: p.as_posix()))  # hidden files (.git/...) are not text
        elif Path(item).is_file():
            files.append(Path(item))
        elif (
            len(specs) > 1 or item.startswith(("/", "./", "../", "~")) or Path(item).suffix in _TEXT_SUFFIXES
        ):
            raise FileNotFoundError(f"text file {item!r} does not exist; check the path.")
        else:
            return None  # not a local path: maybe a `datasets` name such as "owner/name"
    return files


def _dataset_documents(name: str, text_column: str) -> tuple[list[bytes], list[bytes] | None]:
    """Rows of a cached ``datasets`` dataset: (train documents, validation documents or None)."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is in the [hf] extra
        raise ImportError("loading a `datasets` corpus needs `pip install datasets` (hf_fsf[hf]).") from err
    path, _, config = name.partition(":")
    try:
        loaded = datasets.load_dataset(path, config or None)
    except Exception as err:
        raise RuntimeError(
            f"could not load dataset {name!r} with datasets.load_dataset ({type(err).__name__}: {err}). "
            "hf_fsf never downloads at run time: this only works if the dataset is already in the local "
            "Hugging Face cache (HF_DATASETS_CACHE), and no local file has that name. Use spec='stdlib', a local text file or glob, or "
            "download the dataset once on a machine with internet access."
        ) from err

    def rows(split: str) -> list[bytes]:
        table = loaded[split]
        if text_column not in table.column_names:
            raise ValueError(
                f"dataset {name!r} split {split!r} has no column {text_column!r} "
                f"(columns: {table.column_names}); pass text_column=."
            )
        return [str(t).encode("utf-8") for t in table[text_column] if t]

    if "train" not in loaded:
        raise ValueError(f"dataset {name!r} has no 'train' split (splits: {list(loaded)}).")
    held_out = next((s for s in ("validation", "valid", "test") if s in loaded), None)
    return rows("train"), rows(held_out) if held_out else None


def load_text_dataset(
    spec: str | Sequence[str] = "stdlib",
    block_size: int = 128,
    *,
    max_bytes: int | None = 4_000_000,
    validation_fraction: float = 0.1,
    text_column: str = "text",
) -> TextSplits:
    """Byte-level train/validation block datasets for a causal LM (vocabulary size 256).

    ``spec`` is one of:

    - ``"stdlib"``: the Python standard library's source files (see :func:`stdlib_corpus`);
    - local text: a file, a directory (every file below it), a glob pattern, or a list of these;
      several files are held out by file, a single file by its tail;
    - a ``datasets`` name, optionally ``"name:config"``, loaded with ``datasets.load_dataset``.
      This works offline only if the dataset is already cached; otherwise a RuntimeError says so.
      Its validation (or test) split is used when it has one, else whole rows are held out.

    ``max_bytes`` bounds the text read, train and validation together (None: no bound).
    Documents are joined with ``DOCUMENT_SEPARATOR``; each split's tail shorter than a block is dropped.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}.")
    if isinstance(spec, str) and spec == "stdlib":
        train, valid = stdlib_corpus(max_bytes, validation_fraction)
        source = f"Python {sysconfig.get_python_version()} standard library source"
    else:
        files = _local_text_files(spec)
        if files is not None:
            if not files:
                raise FileNotFoundError(f"no files match {spec!r}; check the path or glob pattern.")
            documents = (p.read_bytes() for p in files)  # lazy: stops reading at max_bytes
            train, valid = split_documents(documents, validation_fraction, max_bytes)
            source = f"{len(files)} local file(s) from {spec!r}"
        else:
            train_docs, valid_docs = _dataset_documents(str(spec), text_column)
            if valid_docs is None:
                train, valid = split_documents(train_docs, validation_fraction, max_bytes)
            else:
                valid_bytes = None if max_bytes is None else max(1, int(max_bytes * validation_fraction))
                train = _join(train_docs, None if max_bytes is None else max_bytes - valid_bytes)
                valid = _join(valid_docs, valid_bytes)
            source = f"datasets:{spec}"
    for split_name, data in (("training", train), ("validation", valid)):
        if len(data) < block_size:
            raise ValueError(
                f"the {split_name} text of {source} has {len(data)} bytes, fewer than one block of "
                f"{block_size}; raise max_bytes or lower block_size."
            )
    return TextSplits(ByteBlockDataset(train, block_size), ByteBlockDataset(valid, block_size), source)


def _join(documents: Sequence[bytes], max_bytes: int | None) -> bytes:
    data = DOCUMENT_SEPARATOR.join(documents)
    return data if max_bytes is None else data[:max_bytes]


# --------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------


@dataclass
class DigitsData:
    """scikit-learn's digits: features standardized with the training split's statistics."""

    x_train: torch.Tensor  # (n_train, 64) float
    y_train: torch.Tensor  # (n_train,) long, classes 0..9
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int = 10


def load_digits_tensors(
    test_fraction: float = 0.25, seed: int = 0, dtype: torch.dtype = torch.float32
) -> DigitsData:
    """The 1797 digits as tensors, with a fixed stratified train/test split.

    Each feature is standardized with the mean and standard deviation of the training split
    (constant pixels, e.g. the image border, are only centered), so no test statistic leaks in.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # pragma: no cover - scikit-learn is in the [recipes] extra
        raise ImportError("the digits dataset needs scikit-learn: `pip install scikit-learn`.") from err
    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.data, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    x_tr = torch.as_tensor(x_tr, dtype=torch.float64)
    x_te = torch.as_tensor(x_te, dtype=torch.float64)
    mean = x_tr.mean(dim=0)
    std = x_tr.std(dim=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return DigitsData(
        x_train=((x_tr - mean) / std).to(dtype),
        y_train=torch.as_tensor(y_tr, dtype=torch.long),
        x_test=((x_te - mean) / std).to(dtype),
        y_test=torch.as_tensor(y_te, dtype=torch.long),
    )


# --------------------------------------------------------------------------------------------
# Teacher stream
# --------------------------------------------------------------------------------------------


class TeacherStream:
    """Regression targets from a fixed random teacher network, with fresh inputs every call.

    The teacher is a tanh MLP ``d_in -> hidden -> ... -> d_out`` (``depth`` linear layers) whose
    weights are drawn from ``seed`` with variance 1/fan_in, then its output rescaled so each output
    has unit variance under the input distribution x ~ N(0, I). :meth:`sample` returns
    ``y = teacher(x) + noise * ε`` with ε ~ N(0, I): the best possible MSE (mean over elements) is
    ``noise ** 2`` (``loss_floor``), and a held-out set drawn with another generator has exactly
    the training distribution, so train and test loss measure the same thing.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        noise: float = 0.1,
        seed: int = 0,
        *,
        hidden: int = 64,
        depth: int = 2,
        dtype: torch.dtype = torch.float32,
    ):
        for name, value in (("d_in", d_in), ("d_out", d_out), ("hidden", hidden), ("depth", depth)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
            raise ValueError(
                f"noise (the label-noise standard deviation) must be finite and >= 0, got {noise!r}."
            )
        self.d_in, self.d_out, self.noise, self.seed, self.dtype = d_in, d_out, float(noise), seed, dtype
        gen = torch.Generator().manual_seed(seed)
        widths = [d_in] + [hidden] * (depth - 1) + [d_out]
        # Built in float64 so the teacher is the same function whatever dtype the samples use.
        self._weights = [
            torch.randn(fan_in, fan_out, generator=gen, dtype=torch.float64) / math.sqrt(fan_in)
            for fan_in, fan_out in zip(widths[:-1], widths[1:])
        ]
        probe = torch.randn(8192, d_in, generator=gen, dtype=torch.float64)
        out = self._forward(probe)
        self._out_mean = out.mean(dim=0)
        self._out_std = out.std(dim=0).clamp_min(1e-12)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, w in enumerate(self._weights):
            h = h @ w
            if i < len(self._weights) - 1:
                h = torch.tanh(h)
        return h

    @property
    def loss_floor(self) -> float:
        """The expected MSE (mean over elements) of the Bayes-optimal predictor: noise²."""
        return self.noise**2

    def teacher(self, x: torch.Tensor) -> torch.Tensor:
        """The noiseless target function (zero mean, unit variance per output under N(0, I))."""
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"teacher expects inputs of shape (n, {self.d_in}), got {tuple(x.shape)}.")
        y = (self._forward(x.to(torch.float64)) - self._out_mean) / self._out_std
        return y.to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` fresh pairs (x, y), x ~ N(0, I_{d_in}), y = teacher(x) + noise·ε, in ``self.dtype``.

        Pass a seeded ``torch.Generator`` for reproducible streams (None: the global RNG).
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}.")
        x = torch.randn(n, self.d_in, generator=generator, dtype=torch.float64)
        eps = torch.randn(n, self.d_out, generator=generator, dtype=torch.float64)
        y = self.teacher(x) + self.noise * eps
        return x.to(self.dtype), y.to(self.dtype)
