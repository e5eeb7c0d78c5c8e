"""Built-in text, text loading from every source, calibration windows."""

from __future__ import annotations

import json
import os

import pytest
import torch

from spp_peft.data import (
    builtin_text,
    calibration_windows,
    load_texts,
    out_of_domain_source,
    out_of_domain_text,
    token_stream,
)
from spp_peft.testing import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_builtin_split_is_disjoint_complete_and_by_topic():
    from pydoc_data.topics import topics

    train, heldout = builtin_text("train"), builtin_text("heldout")
    assert set(train).isdisjoint(heldout)
    distinct = []
    for key in sorted(topics):
        if topics[key] not in distinct:
            distinct.append(topics[key])
    assert sorted(train + heldout) == sorted(distinct)
    assert heldout == [text for i, text in enumerate(distinct) if i % 5 == 0]
    assert sum(map(len, heldout)) > 50_000 and sum(map(len, train)) > 300_000
    assert builtin_text("train") == train  # deterministic
    with pytest.raises(ValueError, match="split must be one of"):
        builtin_text("test")


def test_out_of_domain_text():
    docs = out_of_domain_text()
    source = out_of_domain_source()
    assert os.path.isfile(source) and docs and all(d.strip() for d in docs)
    if "GPL" in source:
        assert "GNU GENERAL PUBLIC LICENSE" in docs[0]
    assert load_texts("builtin:ood") == docs


def test_load_texts_builtin_and_lists():
    assert load_texts("builtin") == builtin_text("train")
    assert load_texts("builtin:heldout") == builtin_text("heldout")
    assert load_texts(["a", "b"]) == ["a", "b"]
    with pytest.raises(TypeError, match="only strings"):
        load_texts(["a", 1])
    with pytest.raises(ValueError, match="split must be one of"):
        load_texts("builtin:validation")


def test_load_texts_local_files(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    assert [t.strip() for t in load_texts(txt)] == ["first paragraph\nstill first", "second paragraph"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["x y", "z"])) + "\n")
    assert load_texts(str(jsonl)) == ["x y", "z"]
    js = tmp_path / "c.json"
    js.write_text(json.dumps([{"body": "hello"}, {"body": "world"}]))
    assert load_texts(js, text_field="body") == ["hello", "world"]
    with pytest.raises(ValueError, match="no 'text' field.*body"):
        load_texts(js)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="is a folder"):
        load_texts(str(tmp_path))
    bad = tmp_path / "c.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_texts(bad)


@pytest.mark.skipif(
    not (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")),
    reason="checks the offline error; run with HF_HUB_OFFLINE=1",
)
def test_hub_dataset_offline_is_a_clear_error():
    with pytest.raises(RuntimeError, match="could not load hub dataset 'wikitext'.*split='test'.*builtin"):
        load_texts("wikitext:wikitext-2-raw-v1:test")


def test_calibration_windows_are_seeded_slices_of_the_stream(tok):
    texts = builtin_text("train")
    windows = calibration_windows(tok, texts, nsamples=6, seqlen=32, seed=1)
    assert windows.shape == (6, 32) and windows.dtype == torch.long
    assert torch.equal(windows, calibration_windows(tok, texts, nsamples=6, seqlen=32, seed=1))
    assert not torch.equal(windows, calibration_windows(tok, texts, nsamples=6, seqlen=32, seed=2))
    stream = token_stream(tok, texts).tolist()
    text = bytes(stream)  # every id of this text is < 256, so id sequences can be searched as bytes
    for window in windows.tolist():
        assert bytes(window) in text


def test_calibration_windows_errors(tok):
    with pytest.raises(ValueError, match=r"has 5 tokens, fewer than seqlen \+ 1 = 9"):
        calibration_windows(tok, ["hello"], nsamples=1, seqlen=8)
    with pytest.raises(ValueError, match="must be positive"):
        calibration_windows(tok, "some text", nsamples=0, seqlen=2)


def test_token_stream_joins_documents_with_blank_lines(tok):
    assert tok.decode(token_stream(tok, ["a", "b"])) == "a\n\nb"
    assert token_stream(tok, "a\n\nb").tolist() == token_stream(tok, ["a", "b"]).tolist()
