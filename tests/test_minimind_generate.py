"""minimind.generate and minimind.chat: cached decoding equals uncached, sampling filters, streaming text,
and the bundled base model answering in language."""
import pytest
import torch

from helpers import tiny_minimind
from minimind.generate import decode_reply, generate, process_logits, stream_generate, stream_text
from minimind.model import MiniMindConfig, MiniMindForCausalLM
from minimind.tokenizer import BUNDLED_TOKENIZER, MiniMindTokenizer


def greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("arch,moe", [("minimind2", True), ("minimind3", False)])
def test_cached_greedy_equals_uncached(arch, moe):
    model = tiny_minimind(arch, moe)
    ids = torch.randint(3, 97, (2, 6))
    with torch.no_grad():
        expected = greedy_without_cache(model, ids, 10)
    assert torch.equal(generate(model, ids, max_new_tokens=10, temperature=0, eos_token_id=None), expected)


def test_left_padded_batch_equals_each_row_alone():
    model = tiny_minimind("minimind3")
    a, b = torch.randint(3, 97, (1, 7)), torch.randint(3, 97, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    out = generate(model, batch, attention_mask=mask, max_new_tokens=8, temperature=0, eos_token_id=None)
    assert torch.equal(out[0, 7:], generate(model, a, max_new_tokens=8, temperature=0, eos_token_id=None)[0, 7:])
    assert torch.equal(out[1, 7:], generate(model, b, max_new_tokens=8, temperature=0, eos_token_id=None)[0, 4:])


def test_eos_stops_a_row_and_pads_it():
    model = tiny_minimind()
    ids = torch.randint(3, 97, (2, 5))
    free = generate(model, ids, max_new_tokens=6, temperature=0, eos_token_id=None)
    eos = int(free[0, 6])  # row 0's second generated token plays the eos
    out = generate(model, ids, max_new_tokens=6, temperature=0, eos_token_id=eos, pad_token_id=0)
    first = (free[0, 5:] == eos).nonzero()[0].item()
    assert out[0, 5 + first].item() == eos and (out[0, 6 + first:] == 0).all()
    assert torch.equal(out[1, 5:5 + first + 1], free[1, 5:5 + first + 1])
    steps = list(stream_generate(model, ids[:1], max_new_tokens=6, temperature=0, eos_token_id=eos))
    assert len(steps) == first + 1  # a lone row stops right at its eos


def test_sampling_is_reproducible_and_respects_top_k():
    model = tiny_minimind()
    ids = torch.randint(3, 97, (1, 5))
    runs = [generate(model, ids, max_new_tokens=12, temperature=1.5, top_k=3, top_p=1.0, eos_token_id=None,
                     generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    with torch.no_grad():  # every sampled token was among the 3 most likely at its step
        for t in range(5, 17):
            assert runs[0][0, t] in model(runs[0][:, :t]).logits[0, -1].topk(3).indices


def test_process_logits_filters_and_penalty():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    keep = torch.isfinite(process_logits(logits, top_k=2))
    assert keep.tolist() == [[True, True, False, False, False]]
    probs = logits.softmax(-1)[0]  # 0.61, 0.22, 0.14, ...: top_p 0.7 needs the first two
    keep = torch.isfinite(process_logits(logits, top_p=0.7))
    assert keep.tolist() == [[True, True, False, False, False]] and probs[0] < 0.7 < probs[:2].sum()
    assert torch.isfinite(process_logits(logits, top_p=0.5)).sum() == 1  # the best token always stays
    seen = torch.tensor([[True, False, False, True, False]])
    out = process_logits(logits, seen, repetition_penalty=2.0)
    assert out.tolist() == [[1.0, 1.0, 0.5, -2.0, -3.0]]  # positive seen / 2, negative seen * 2
    assert torch.allclose(process_logits(logits, temperature=0.5), logits * 2)
    assert torch.equal(process_logits(logits, seen, temperature=0, repetition_penalty=2.0), out)  # greedy: penalty only
    with pytest.raises(ValueError, match="top_p must be in"):
        process_logits(logits, top_p=0)


def test_stream_text_waits_for_whole_characters():
    if not (BUNDLED_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("bundled tokenizer not built")
    tok = MiniMindTokenizer.from_pretrained()
    text = "Hi 你好😀 world"
    ids = tok.encode(text)
    pieces = list(stream_text(tok, [torch.tensor([i]) for i in ids + [2, 5]]))
    assert "".join(pieces) == text  # stops at <|im_end|> (id 2)
    assert not any("\ufffd" in p for p in pieces) and len(pieces) > 1


def test_a_reply_cut_inside_a_character_ends_before_it():
    """A reply cut off by max_new_tokens in the middle of a multi-byte character: the whole characters before
    it, never U+FFFD (in the reply and in the stream alike)."""
    if not (BUNDLED_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("bundled tokenizer not built")
    tok = MiniMindTokenizer.from_pretrained()
    ids = tok.encode("Hi 😀")
    cut = next(n for n in range(len(ids), 0, -1) if tok.decode(ids[:n]).endswith("\ufffd"))
    assert tok.decode(ids[:cut]).endswith("\ufffd")  # the tokenizer alone shows the broken character
    assert decode_reply(tok, ids[:cut]) == "Hi "
    assert "".join(stream_text(tok, [torch.tensor([i]) for i in ids[:cut]])) == "Hi "
    assert decode_reply(tok, ids) == "Hi 😀"


@pytest.mark.parametrize("question,expected", [
    ("What is the capital of France?", "Paris"),
    ("日本的首都是哪里？", "东京"),
    ("Who are you?", "MiniMind"),
])
def test_bundled_base_answers_in_language(bundled, question, expected):
    model, tok = bundled
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=True)
    out = generate(model, torch.tensor([prompt]), max_new_tokens=40, temperature=0, eos_token_id=tok.eos_token_id)
    answer = tok.decode(out[0, len(prompt):], skip_special_tokens=True)
    assert expected in answer, answer


# ---------------------------------------------------------------------------------------------------
# A batch whose prompts each name their adapter


def two_adapter_model(vocab_size):
    """A tiny random base with adapters "qa" (rank 4) and "tr" (rank 2, alpha 8), B random so both matter."""
    from lora_kernels import LoRAConfig, add_adapter, replace_linear_with_fused_lora

    torch.manual_seed(0)
    cfg = MiniMindConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=vocab_size, max_position_embeddings=128)
    model = MiniMindForCausalLM(cfg).eval()
    replace_linear_with_fused_lora(model, rank=4, target_modules="all-linear", adapter_name="qa")
    add_adapter(model, "tr", config=LoRAConfig(rank=2, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.3)
    return model


def test_generate_batch_answers_each_prompt_as_alone_with_its_adapter():
    from lora_kernels import set_adapter
    from minimind.generate import generate_batch

    tok = MiniMindTokenizer.from_pretrained()
    model = two_adapter_model(tok.vocab_size)
    prompts = ["Who are you?", "你好", [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Translate: good morning"}], "2+3=?"]
    adapters = ["qa", None, "tr", "tr"]
    got = generate_batch(model, tok, prompts, adapters=adapters, max_new_tokens=10, eos_token_id=None)
    for prompt, name, answer in zip(prompts, adapters, got):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = torch.tensor([tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)])
        set_adapter(model, [] if name is None else name)
        alone = generate(model, ids, max_new_tokens=10, temperature=0, eos_token_id=None)
        assert answer == tok.decode(alone[0, ids.shape[1]:], skip_special_tokens=True), (prompt, name)
    set_adapter(model, "qa")
    # The adapters matter: the base alone, or the other adapter, answers otherwise.
    base = generate_batch(model, tok, prompts, adapters=[None] * 4, max_new_tokens=10, eos_token_id=None)
    swapped = generate_batch(model, tok, prompts, adapters=["tr", None, "qa", "qa"], max_new_tokens=10,
                             eos_token_id=None)
    assert base[0] != got[0] and base[2] != got[2] and swapped[0] != got[0] and swapped[1] == got[1]


def test_generate_batch_refuses_a_wrong_number_of_adapters():
    from minimind.generate import generate_batch

    tok = MiniMindTokenizer.from_pretrained()
    model = two_adapter_model(tok.vocab_size)
    with pytest.raises(ValueError, match="2 prompts, 1 adapters"):
        generate_batch(model, tok, ["a", "b"], adapters=["qa"])


def many_adapter_model(vocab_size, n=64):
    """A tiny random base (hidden 64) with ``n`` adapters a0..a{n-1} of ranks 4..64 (alpha and targets varying:
    every fourth only on the square layers), every lora_B random so that each adapter matters."""
    from lora_kernels import LoRAConfig, add_adapter, replace_linear_with_fused_lora

    torch.manual_seed(0)
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=vocab_size, max_position_embeddings=128)
    model = MiniMindForCausalLM(cfg).eval()
    ranks = [4 + 60 * i // (n - 1) for i in range(n)]
    for i, rank in enumerate(ranks):
        config = LoRAConfig(rank=rank, alpha=rank * (1 + i % 3) / 2)
        targets = "square" if i % 4 == 3 else "all-linear"
        if i == 0:
            replace_linear_with_fused_lora(model, config=config, target_modules=targets, adapter_name="a0")
        else:
            add_adapter(model, f"a{i}", target_modules=targets, config=config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.3 / p.shape[-1] ** 0.5 if "lora_A" in name else 0.3)
    return model, ranks


@pytest.mark.filterwarnings("ignore:rank .* parameters as the layer itself")
def test_generate_batch_with_64_rank_varying_adapters_equals_each_prompt_alone(monkeypatch):
    """Issue #21's serving case: 64 adapters (ranks 4..64) and 8 prompts of the base in one batch of prompts of
    different lengths; greedy, every row's tokens are the ones its prompt gets alone with its adapter active."""
    import importlib

    from lora_kernels import set_adapter

    gen = importlib.import_module("minimind.generate")  # the module (the package's `generate` is the function)

    tok = MiniMindTokenizer.from_pretrained()
    model, ranks = many_adapter_model(tok.vocab_size)
    assert min(ranks) == 4 and max(ranks) == 64
    n, steps = len(ranks), 4
    names = [f"a{i}" for i in range(n)] + [None] * 8
    names = names[::3] + names[1::3] + names[2::3]  # adapters and None interleaved
    prompts = [f"Question {i}: " + "tell me more " * (i % 11) for i in range(len(names))]
    rows = []
    real_decode = gen.decode_reply
    monkeypatch.setattr(gen, "decode_reply", lambda t, ids: rows.append(list(ids)) or real_decode(t, ids))
    gen.generate_batch(model, tok, prompts, adapters=names, max_new_tokens=steps, eos_token_id=None)
    batched, rows[:] = list(rows), []
    gen.generate_batch(model, tok, prompts, adapters=[None] * len(prompts), max_new_tokens=steps, eos_token_id=None)
    base = list(rows)
    for prompt, name, got in zip(prompts, names, batched):
        ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                    tokenize=True)])
        set_adapter(model, [] if name is None else name)
        alone = generate(model, ids, max_new_tokens=steps, temperature=0, eos_token_id=None)[0, ids.shape[1]:]
        assert got == alone.tolist(), (prompt, name)
    # The adapters matter: most adapted rows answer otherwise than the base; the base rows answer as the base.
    assert sum(got != b for got, b, name in zip(batched, base, names) if name is not None) >= n * 3 // 4
    assert all(got == b for got, b, name in zip(batched, base, names) if name is None)


def test_generate_batch_of_base_prompts_on_a_model_without_lora():
    from minimind.generate import generate_batch

    tok = MiniMindTokenizer.from_pretrained()
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                               num_key_value_heads=2, vocab_size=tok.vocab_size)).eval()
    kwargs = dict(max_new_tokens=3, eos_token_id=None)
    assert generate_batch(model, tok, ["hi", "ho"], adapters=[None, None], **kwargs) == \
        generate_batch(model, tok, ["hi", "ho"], **kwargs)
    with pytest.raises(ValueError, match="qa"):
        generate_batch(model, tok, ["hi"], adapters=["qa"], **kwargs)
