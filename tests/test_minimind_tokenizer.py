"""minimind.tokenizer: ids and chat formats equal MiniMind's own tokenizers; the bundled tokenizer."""
import json
from pathlib import Path

import pytest

from helpers import MINIMIND_FIXTURES
from minimind.tokenizer import BUNDLED_TOKENIZER, MiniMindTokenizer, render_chat
from minimind.train_tokenizer import train_tokenizer

FIXTURES = MINIMIND_FIXTURES
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "人工智能是计算机科学的一个分支，它企图了解智能的实质。",
    "混合 text：MiniMind2 有 26M 参数 😀\n\n  two spaces, tabs\tand 12345.",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "你好，请介绍一下自己"}, {"role": "assistant", "content": "我是一个小模型。"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd them\n</think>\n4"}],
    [{"role": "user", "content": "Only a question"}],
]


def fixture_tokenizer(generation: str) -> Path:
    path = FIXTURES / f"tokenizer_{generation}"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"MiniMind fixture tokenizer_{generation} not found under {FIXTURES} (needs the shared fixtures checkout)")
    return path


@pytest.mark.parametrize("generation", ["minimind2", "minimind3"])
def test_ids_and_chat_text_equal_minimind_tokenizers(generation):
    path = fixture_tokenizer(generation)
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle for MiniMind's tokenizer")
    oracle = transformers.AutoTokenizer.from_pretrained(str(path))
    ours = MiniMindTokenizer.from_pretrained(path)
    assert ours.chat_style == generation and ours.vocab_size == len(oracle)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == oracle.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == oracle.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == oracle.decode(ids, skip_special_tokens=True), text
    for conv in CONVERSATIONS:
        for gen_prompt in (False, True):
            expected = oracle.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen_prompt)
            assert ours.apply_chat_template(conv, add_generation_prompt=gen_prompt) == expected
            assert ours.apply_chat_template(conv, add_generation_prompt=gen_prompt, tokenize=True) == ours.encode(expected)


def test_chat_formats_exact_strings():
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    text, spans = render_chat(conv, "minimind2")
    assert text == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
                    "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert [text[a:b] for a, b in spans] == ["Hello<|im_end|>\n"]
    text, spans = render_chat(conv, "minimind3", add_generation_prompt=True)
    assert text == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n"
                    "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert [text[a:b] for a, b in spans] == ["<think>\n\n</think>\n\nHello<|im_end|>\n"]
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        render_chat([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="content must be a string"):
        render_chat([{"role": "user", "content": None}])


def test_bundled_tokenizer():
    if not (BUNDLED_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("bundled tokenizer not built (python -m minimind.train_tokenizer)")
    tok = MiniMindTokenizer.from_pretrained()
    assert tok.vocab_size == 6400 and tok.chat_style == "minimind2"
    assert [tok.encode(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [[0], [1], [2]]
    for text in TEXTS[:3] + ["我是Lumen，一个用lora_kernels微调的小模型。"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < 6400 for i in ids)
    # Trained on the bundled corpus: common words are single tokens, so text is compressed.
    assert len(tok.encode("The capital of France is Paris.")) <= 8
    assert len(tok.encode("法国的首都是巴黎。")) <= 6


def test_save_reload_and_transformers_reads_it(tmp_path):
    tok = train_tokenizer([_tiny_corpus(tmp_path)], vocab_size=300)
    assert [tok.tokenizer.id_to_token(i) for i in range(3)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.vocab_size <= 300
    tok.save(tmp_path / "tok")
    again = MiniMindTokenizer.from_pretrained(tmp_path / "tok")
    text = "the cat sat 猫坐着"
    assert again.encode(text) == tok.encode(text) and again.decode(tok.encode(text)) == text
    transformers = pytest.importorskip("transformers")
    oracle = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    for conv in CONVERSATIONS:
        assert oracle.apply_chat_template(conv, tokenize=False) == again.apply_chat_template(conv, add_generation_prompt=False)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        MiniMindTokenizer.from_pretrained(tmp_path)
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE(vocab={"<pad>": 0, "<|im_start|>": 1, "<|im_end|>": 2}, merges=[])).save(str(tmp_path / "t.json"))
    with pytest.raises(ValueError, match=r"expected special tokens .* at ids \[0, 1, 2\], got \[None, 1, 2\]"):
        MiniMindTokenizer.from_pretrained(tmp_path / "t.json")


def _tiny_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": "the cat sat on the mat. 猫坐在垫子上。"}] * 5 + [
        {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path
