"""hf_fsf.data: offline corpora and datasets."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from hf_fsf.data import (
    VOCAB_SIZE,
    ByteBlockDataset,
    TeacherStream,
    decode,
    encode,
    load_digits_tensors,
    load_text_dataset,
    split_documents,
    stdlib_corpus,
    stdlib_files,
)


def test_stdlib_files_are_the_library_source_in_a_fixed_order():
    files = stdlib_files()
    assert len(files) > 100
    assert all(f.suffix == ".py" for f in files)
    parts = {part for f in files for part in f.parts}
    assert not parts & {"test", "tests", "site-packages", "__pycache__"}
    assert list(files) == sorted(files, key=lambda f: f.relative_to(files[0].parent).as_posix())
    assert any(f.name == "argparse.py" for f in files)


def test_stdlib_corpus_is_fast_bounded_and_held_out_by_file():
    start = time.perf_counter()
    train, valid = stdlib_corpus(max_bytes=3_000_000, validation_fraction=0.1)
    assert time.perf_counter() - start < 2.0
    total = len(train) + len(valid)
    assert 2_900_000 < total <= 3_000_000 + 2_000  # bound, plus one separator per file
    assert 0.05 < len(valid) / total < 0.2
    # every whole file read is in exactly one split: held out by file, never by chunk
    checked = 0
    for path in stdlib_files()[:80]:
        content = path.read_bytes()
        if len(content) > 4000:
            assert (content in train) != (content in valid), path
            checked += 1
    assert checked > 10
    assert stdlib_corpus(max_bytes=3_000_000) == (train, valid)  # deterministic


def test_split_documents_single_document_holds_out_its_tail():
    train, valid = split_documents([b"abcdefghij"], validation_fraction=0.3)
    assert (train, valid) == (b"abcdefg", b"hij")
    with pytest.raises(ValueError, match="validation_fraction"):
        split_documents([b"abc"], validation_fraction=1.5)


def test_byte_blocks_are_the_corpus_bytes():
    data = bytes(range(256)) * 3 + b"tail"
    dataset = ByteBlockDataset(data, block_size=100)
    assert len(dataset) == len(data) // 100
    item = dataset[3]
    assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (100,)
    assert item["input_ids"].tolist() == list(data[300:400])
    assert torch.equal(item["labels"], item["input_ids"])
    assert dataset[-1]["input_ids"].tolist() == list(data[(len(dataset) - 1) * 100 : len(dataset) * 100])
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["input_ids"].shape == (4, 100) and int(batch["input_ids"].max()) < VOCAB_SIZE


def test_encode_decode_round_trip():
    text = "déjà vu: ∂L/∂f ≠ 0 🙂"
    ids = encode(text)
    assert ids.dtype == torch.long and int(ids.max()) < VOCAB_SIZE
    assert decode(ids) == text


def test_load_text_dataset_stdlib_default():
    splits = load_text_dataset(block_size=64, max_bytes=200_000)
    assert splits.vocab_size == 256
    assert len(splits.train) > 5 * len(splits.validation) > 0
    assert "standard library" in splits.source
    first = decode(splits.train[0]["input_ids"])
    assert first == stdlib_files()[0].read_text()[:64]


def test_load_text_dataset_local_files(tmp_path: Path):
    for i in range(10):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 50)
    by_glob = load_text_dataset(str(tmp_path / "*.txt"), block_size=32, validation_fraction=0.2)
    by_dir = load_text_dataset(str(tmp_path), block_size=32, validation_fraction=0.2)
    assert len(by_glob.train) == len(by_dir.train) > 0 and len(by_glob.validation) > 0
    valid_text = decode(
        torch.cat([by_glob.validation[i]["input_ids"] for i in range(len(by_glob.validation))])
    )
    train_text = decode(torch.cat([by_glob.train[i]["input_ids"] for i in range(len(by_glob.train))]))
    held_out = {word for word in valid_text.split() if word.isdigit()}
    assert held_out and not held_out & {word for word in train_text.split() if word.isdigit()}
    single = load_text_dataset(str(tmp_path / "doc0.txt"), block_size=16, validation_fraction=0.25)
    assert len(single.train) == int(len(b"document 0 ") * 50 * 0.75) // 16


def test_load_text_dataset_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_dataset(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        load_text_dataset(str(tmp_path / "*.md"))
    (tmp_path / "small.txt").write_text("short")
    with pytest.raises(ValueError, match="max_bytes or lower block_size"):
        load_text_dataset(str(tmp_path / "small.txt"), block_size=64)
    with pytest.raises(ValueError, match="block_size"):
        load_text_dataset(block_size=0)


def test_uncached_datasets_name_raises_a_clear_offline_error():
    with pytest.raises(RuntimeError, match="local Hugging Face cache"):
        load_text_dataset("hf-fsf-test/no-such-dataset", block_size=16)


def test_cached_datasets_rows_are_byte_encoded(monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = {"train": [f"row {i} " * 20 for i in range(30)], "validation": ["held out " * 40] * 3}
    fake = datasets.DatasetDict({k: datasets.Dataset.from_dict({"content": v}) for k, v in rows.items()})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None: calls.append((path, name)) or fake)
    splits = load_text_dataset("owner/corpus:cfg", block_size=32, text_column="content", max_bytes=None)
    assert calls == [("owner/corpus", "cfg")]
    assert decode(splits.validation[0]["input_ids"]) == ("held out " * 40)[:32]
    assert len(splits.train) == len("\n".join(rows["train"]).encode()) // 32
    with pytest.raises(ValueError, match="text_column"):
        load_text_dataset("owner/corpus", block_size=32)


def test_digits_split_is_fixed_and_standardized_with_train_statistics():
    data = load_digits_tensors(test_fraction=0.25, seed=0)
    assert data.x_train.shape == (1347, 64) and data.x_test.shape == (450, 64)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.long
    x = data.x_train.double()
    assert x.mean(0).abs().max() < 1e-5
    stds = x.std(0)
    assert ((stds - 1).abs() < 1e-5).logical_or(stds < 1e-6).all()
    assert (stds < 1e-6).any()  # constant border pixels are only centered
    assert data.x_test.double().mean(0).abs().max() > 1e-3  # test set not standardized with its own stats
    counts = torch.bincount(torch.cat([data.y_train, data.y_test]), minlength=10)
    from sklearn.datasets import load_digits

    assert counts.tolist() == torch.bincount(torch.as_tensor(load_digits().target)).tolist()
    again = load_digits_tensors(test_fraction=0.25, seed=0)
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_test, data.y_test)


def test_teacher_stream_loss_floor_and_reproducibility():
    stream = TeacherStream(d_in=8, d_out=3, noise=0.3, seed=0)
    assert stream.loss_floor == pytest.approx(0.09)
    x, y = stream.sample(100_000, torch.Generator().manual_seed(1))
    assert x.shape == (100_000, 8) and y.shape == (100_000, 3) and y.dtype == torch.float32
    residual = (y.double() - stream.teacher(x.double())).pow(2).mean().item()
    assert residual == pytest.approx(stream.loss_floor, rel=0.03)  # the Bayes predictor sits on the floor
    clean_var = stream.teacher(x.double()).var(0)
    assert torch.allclose(clean_var, torch.ones(3, dtype=torch.float64), atol=0.05)  # unit signal per output

    x1, y1 = stream.sample(16, torch.Generator().manual_seed(5))
    x2, y2 = TeacherStream(8, 3, 0.3, seed=0).sample(16, torch.Generator().manual_seed(5))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # same seed, same teacher and stream
    gen = torch.Generator().manual_seed(5)
    first, second = stream.sample(16, gen), stream.sample(16, gen)
    assert not torch.equal(first[0], second[0])  # fresh inputs every call
    other = TeacherStream(8, 3, 0.3, seed=1)
    assert not torch.allclose(other.teacher(x1.double()), stream.teacher(x1.double()))


def test_teacher_stream_rejects_bad_arguments():
    with pytest.raises(ValueError, match="noise"):
        TeacherStream(4, 1, noise=-1.0)
    with pytest.raises(ValueError, match="d_in"):
        TeacherStream(0, 1)
    with pytest.raises(ValueError, match="shape"):
        TeacherStream(4, 1).teacher(torch.zeros(2, 5))
