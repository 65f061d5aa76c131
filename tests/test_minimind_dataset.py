"""minimind.dataset: the SFT loss mask lands exactly on assistant replies; errors name file and line."""
import json
from pathlib import Path

import pytest
import torch

from minimind.dataset import NoTrainableTokensError, PretrainDataset, SFTDataset, encode_conversation, pad_batch
from minimind.tokenizer import MiniMindTokenizer
from minimind.train_tokenizer import train_tokenizer

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "和3+3呢？"},
    {"role": "assistant", "content": "是6。😀"},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A small trained tokenizer in both chat styles."""
    root = tmp_path_factory.mktemp("tok")
    path = root / "corpus.jsonl"
    rows = [{"text": "What is two plus two? It is four. 和三加三呢？是六。You are terse. assistant user system"}] * 4
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    tok = train_tokenizer([path], vocab_size=400)
    return {style: MiniMindTokenizer(tok.tokenizer, chat_style=style) for style in ("minimind2", "minimind3")}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def minimind_mask(ids, tok):
    """MiniMind's own rule as an independent oracle: after each `<|im_start|>assistant\\n` token run, up to and
    including the next `<|im_end|>\\n`."""
    start, end = tok.encode("<|im_start|>assistant\n"), tok.encode("<|im_end|>\n")
    mask, i = [0] * len(ids), 0
    while i < len(ids):
        if ids[i:i + len(start)] == start:
            j = i + len(start)
            while j < len(ids) and ids[j:j + len(end)] != end:
                j += 1
            for k in range(i + len(start), min(j + len(end), len(ids))):
                mask[k] = 1
            i = j + len(end)
        else:
            i += 1
    return mask


@pytest.mark.parametrize("style", ["minimind2", "minimind3"])
def test_mask_covers_exactly_the_assistant_replies(tokenizers, style):
    tok = tokenizers[style]
    ids, labels = encode_conversation(tok, CONV, max_seq_len=1000)
    assert ids == tok.encode(tok.apply_chat_template(CONV, add_generation_prompt=False))
    trained = [int(l != -100) for l in labels]
    assert trained == minimind_mask(ids, tok)
    assert all(l == i for i, l in zip(ids, labels) if l != -100)
    runs, current = [], []
    for i, t in zip(ids, trained):
        if t:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    think = "<think>\n\n</think>\n\n" if style == "minimind3" else ""
    assert [tok.decode(r) for r in runs] == [f"{think}It is 4.<|im_end|>\n", f"{think}是6。😀<|im_end|>\n"]
    assert tok.decode(ids[: trained.index(1)]).endswith("<|im_start|>assistant\n")


def test_sft_dataset_truncates_and_pads(tokenizers, tmp_path):
    tok = tokenizers["minimind2"]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": CONV}, "", {"conversations": CONV[1:3]}])
    full_ids, full_labels = encode_conversation(tok, CONV, 1000)
    ds = SFTDataset(path, tok, max_seq_len=200)
    assert len(ds) == 2
    ids, labels = ds[0]
    assert ids.shape == labels.shape == (200,) and ids.dtype == labels.dtype == torch.long
    n = len(full_ids)
    assert ids[:n].tolist() == full_ids and labels[:n].tolist() == full_labels
    assert (ids[n:] == 0).all() and (labels[n:] == -100).all()
    short = SFTDataset(path, tok, max_seq_len=32, pad=False)  # the second conversation's answer starts within 32
    ids, labels = short[0]
    assert len(full_ids) > 32 and ids.tolist() == full_ids[:32] and labels.tolist() == full_labels[:32]
    assert short.conversation(1) == CONV[1:3]
    batch_ids, batch_labels = pad_batch([short[0], short[1]], pad_id=0)
    assert batch_ids.shape == (2, 32) and batch_labels[1, len(short[1][0]):].eq(-100).all()


@pytest.mark.parametrize("line,message", [
    ('{"conversations": [}', r"bad\.jsonl:3: invalid JSON"),
    ('{"messages": []}', r"bad\.jsonl:3: expected an object with a non-empty 'conversations' list"),
    ('{"conversations": [{"role": "bot", "content": "x"}]}', r"bad\.jsonl:3: turn 0 must be"),
    ('{"conversations": [{"role": "user", "content": 5}]}', r"bad\.jsonl:3: turn 0 must be"),
    ('{"conversations": [{"role": "user", "content": "hi"}]}', r"bad\.jsonl:3: conversation has no assistant turn"),
])
def test_malformed_line_names_file_and_line(tokenizers, tmp_path, line, message):
    good = {"conversations": CONV[1:3]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, line, good])
    with pytest.raises(ValueError, match=message):
        SFTDataset(path, tokenizers["minimind2"])


def test_empty_or_missing_file(tokenizers, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no conversations \(the file is empty\)"):
        SFTDataset(tmp_path / "empty.jsonl", tokenizers["minimind2"])
    with pytest.raises(FileNotFoundError, match="data file not found"):
        SFTDataset(tmp_path / "missing.jsonl", tokenizers["minimind2"])


def test_pretrain_dataset_packs_text_and_chat(tokenizers, tmp_path):
    tok = tokenizers["minimind2"]
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": "It is four."}] * 6 + [{"conversations": CONV[1:3]}])
    ds = PretrainDataset(path, tok, max_seq_len=16)
    chat_text = tok.apply_chat_template(CONV[1:3], add_generation_prompt=False)
    stream = tok.encode("<|im_start|>It is four.<|im_end|>" * 6 + chat_text)
    assert ds.num_tokens == len(stream) and len(ds) == len(stream) // 16
    x, y = ds[1]
    assert x.tolist() == y.tolist() == stream[16:32]
    bad = write_jsonl(tmp_path / "pre_bad.jsonl", [{"text": "ok"}, {"title": "no text"}])
    with pytest.raises(ValueError, match=r"pre_bad\.jsonl:2: expected"):
        PretrainDataset(bad, tok, max_seq_len=4)
    with pytest.raises(ValueError, match="less than one block"):
        PretrainDataset(path, tok, max_seq_len=10_000)


def test_sft_data_whose_answers_are_all_cut_is_refused(tmp_path, long_prompt_data):
    with pytest.raises(NoTrainableTokensError) as err:
        SFTDataset(tmp_path / "long_prompts.jsonl", MiniMindTokenizer.from_pretrained(), max_seq_len=8)
    assert all(word in str(err.value) for word in ["long_prompts.jsonl", "max_seq_len=8"]), str(err.value)
