"""minimind.chat: one-shot and interactive chat with the bundled base, named adapters and a batch of prompts
each with its adapter; bad input ends in one line and exit status 2; Ctrl-C is 130; a bug keeps its traceback; a long
prompt shortens the answer, not the prompt."""
import io
import os
import sys

import pytest
import torch

from helpers import (
    ROOT,
    adapted_model,
    assert_one_line_error,
    nan_adapter,
    pickled_payload,
    tokenizer_dir,
    truncated,
)
from lora_kernels import save_lora
from minimind import chat
from minimind.checkpoint import BUNDLED_BASE, load_minimind
from minimind.tokenizer import MiniMindTokenizer


# ---------------------------------------------------------------------------------------------------
# With the bundled base


def test_chat_cli_one_shot(bundled, capsys):
    chat.main(["--prompt", "What color is snow?", "--temperature", "0", "--max-new-tokens", "20"])
    out = capsys.readouterr().out
    assert ">>> What color is snow?" in out and "white" in out.lower()


def test_chat_interactive_keeps_history_and_resets(bundled, capsys, monkeypatch):
    typed = iter(["What color is snow?", "/reset", "", "Hello!", "/exit"])
    seen = []
    real_build = chat.build_prompt

    def spy(tokenizer, messages, limit, **kwargs):
        seen.append([m["content"] for m in messages])
        return real_build(tokenizer, messages, limit, **kwargs)

    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    monkeypatch.setattr(chat, "build_prompt", spy)
    chat.main(["--temperature", "0", "--max-new-tokens", "16"])
    assert seen == [["What color is snow?"], ["Hello!"]]  # /reset forgot the first exchange
    assert "white" in capsys.readouterr().out.lower()


def test_build_prompt_drops_oldest_turns_to_fit(bundled):
    _, tok = bundled
    turns = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        turns += [{"role": "user", "content": f"question number {i} about pandas"},
                  {"role": "assistant", "content": "ok " * 10}]
    turns.append({"role": "user", "content": "last question"})
    full = tok.apply_chat_template(turns, tokenize=True)
    ids = chat.build_prompt(tok, turns, limit=len(full) - 1)
    text = tok.decode(ids)
    assert len(ids) < len(full) and text.startswith("<|im_start|>system\nBe brief.")
    assert "question number 0" not in text and "last question" in text and text.endswith("<|im_start|>assistant\n")
    assert len(chat.build_prompt(tok, turns[-1:], limit=3)) == 3  # a single over-long turn keeps its tail


def test_chat_switches_between_named_adapters(bundled, tmp_path, capsys, monkeypatch):
    from lora_kernels import active_adapters, replace_linear_with_fused_lora
    from minimind.lora_io import save_minimind_lora

    for i, name in enumerate(("qa", "tr")):
        torch.manual_seed(i)
        adapted = replace_linear_with_fused_lora(load_minimind(), rank=2)
        save_minimind_lora(adapted, tmp_path / f"{name}.pth")
    typed = iter(["Hi", "/adapter", "/adapter tr", "Hi", "/adapter nope", "/adapter none", "Hi", "/adapter qa,tr",
                  "Hi", "/exit"])
    active = []
    real_reply = chat.reply
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    monkeypatch.setattr(chat, "reply", lambda model, *a: active.append(active_adapters(model)) or real_reply(model, *a))
    chat.main(["--lora", f"qa={tmp_path / 'qa.pth'}", "--lora", f"tr={tmp_path / 'tr.pth'}", "--temperature", "0",
               "--max-new-tokens", "4"])
    assert active == [["qa"], ["tr"], [], ["qa", "tr"]]
    out = capsys.readouterr().out
    assert "adapters: qa, tr; active: qa" in out and "no adapter named 'nope'" in out
    assert "active: none (the base model)" in out


def test_chat_refuses_a_repeated_adapter_name(tmp_path, capsys):
    assert chat.main(["--lora", "a=x.pth", "--lora", "a=y.pth", "--prompt", "hi"]) == 2
    assert "'a' is given twice" in capsys.readouterr().err


def test_chat_answers_prompts_in_one_batch_each_with_its_adapter(bundled, tmp_path, capsys):
    """--prompt-adapter: the batch gives each prompt the answer it gets alone with that adapter active."""
    from lora_kernels import replace_linear_with_fused_lora
    from minimind.lora_io import save_minimind_lora

    for i, name in enumerate(("qa", "tr")):
        torch.manual_seed(i)
        adapted = replace_linear_with_fused_lora(load_minimind(), rank=2)
        with torch.no_grad():
            for _, layer in adapted.named_modules():
                if hasattr(layer, "lora_B") and layer.lora_B is not None:
                    layer.lora_B.normal_(std=0.2)
        save_minimind_lora(adapted, tmp_path / f"{name}.pth")
    loras = ["--lora", f"qa={tmp_path / 'qa.pth'}", "--lora", f"tr={tmp_path / 'tr.pth'}"]
    settings = ["--temperature", "0", "--max-new-tokens", "12"]
    questions = ["What color is snow?", "Who are you?", "What is the capital of France?"]
    chat.main([*loras, *settings, "--prompt", questions[0], "--prompt-adapter", "tr", "--prompt", questions[1],
               "--prompt-adapter", "none", "--prompt", questions[2], "--prompt-adapter", "qa"])
    batched = capsys.readouterr().out.splitlines()
    assert batched[0::2] == [f">>> [tr] {questions[0]}", f">>> [none] {questions[1]}", f">>> [qa] {questions[2]}"]
    alone = []
    for question, lora in ((questions[0], [loras[3]]), (questions[1], []), (questions[2], [loras[1]])):
        chat.main([*(["--lora", lora[0]] if lora else []), *settings, "--prompt", question])
        alone.append(capsys.readouterr().out.splitlines()[1])
    assert batched[1::2] == alone
    assert chat.main([*loras, "--prompt", "hi", "--prompt-adapter", "nope"]) == 2
    assert "--prompt-adapter 'nope': no adapter of that name; loaded: qa, tr" in capsys.readouterr().err
    assert chat.main([*loras, "--prompt", "hi", "--prompt", "ho", "--prompt-adapter", "qa"]) == 2
    assert "2 prompts, 1 adapters" in capsys.readouterr().err


def test_chat_answers_64_prompts_with_64_adapters_in_one_batch(bundled, tmp_path, capsys):
    """--prompt-adapter at issue #21's scale: 64 adapter files of ranks 4..64, 64 prompts each with its adapter and
    3 with none, one batch; each answer is the one its prompt gets alone with its adapter active."""
    from lora_kernels import LoRAConfig, add_adapter, replace_linear_with_fused_lora, set_adapter
    from minimind.generate import decode_reply, generate
    from minimind.lora_io import save_minimind_lora

    model, tok = load_minimind(), MiniMindTokenizer.from_pretrained()
    torch.manual_seed(0)
    loras, names = [], []
    for i in range(64):
        name, config = f"a{i}", LoRAConfig(rank=4 + 60 * i // 63)
        if i == 0:
            replace_linear_with_fused_lora(model, config=config, adapter_name=name)
        else:
            add_adapter(model, name, config=config)
        with torch.no_grad():
            for layer in model.modules():
                if hasattr(layer, "lora_params") and name in layer.lora_configs:
                    layer.lora_params(name)[1].normal_(std=0.3)
        save_minimind_lora(model, tmp_path / f"{name}.pth", adapter_name=name)
        loras += ["--lora", f"{name}={tmp_path / f'{name}.pth'}"]
        names.append(name)
    names = names[:30] + ["none"] + names[30:] + ["none", "none"]
    questions = ["What color is snow?", "Who are you?", "What is the capital of France?", "讲一个故事。", "2+3=?"]
    prompts = [questions[i % 5] + " Please answer briefly." * (i % 3) for i in range(len(names))]
    argv = [*loras, "--temperature", "0", "--repetition-penalty", "1", "--max-new-tokens", "6"]
    for prompt, name in zip(prompts, names):
        argv += ["--prompt", prompt, "--prompt-adapter", name]
    assert chat.main(argv) == 0
    out = capsys.readouterr().out
    alone = []
    for prompt, name in zip(prompts, names):
        set_adapter(model, [] if name == "none" else name)
        ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                    tokenize=True)])
        row = generate(model, ids, max_new_tokens=6, temperature=0, eos_token_id=None)[0, ids.shape[1]:].tolist()
        alone.append(decode_reply(tok, row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row))
    assert out == "".join(f">>> [{name}] {prompt}\n{answer}\n" for prompt, name, answer in zip(prompts, names, alone))
    base = {prompt: answer for prompt, name, answer in zip(prompts, names, alone) if name == "none"}
    differ = sum(answer != base[prompt] for prompt, answer in zip(prompts, alone) if prompt in base)
    assert len(base) == 3 and differ >= 4  # the adapters matter


def test_chat_prompt_adapter_none_without_any_lora_runs_the_base(bundled, capsys):
    settings = ["--temperature", "0", "--max-new-tokens", "8"]
    assert chat.main([*settings, "--prompt", "What color is snow?", "--prompt-adapter", "none"]) == 0
    batched = capsys.readouterr().out.splitlines()
    assert chat.main([*settings, "--prompt", "What color is snow?"]) == 0
    assert batched == [">>> [none] What color is snow?", capsys.readouterr().out.splitlines()[1]]


# ---------------------------------------------------------------------------------------------------
# Bad input and interruptions


def base_copy(tmp_path, name="base.safetensors"):
    path = tmp_path / name
    path.write_bytes(BUNDLED_BASE.read_bytes())
    return path


def wrong_model_adapter(tmp_path):
    path = tmp_path / "other.safetensors"
    save_lora(adapted_model(), path)
    return path


PROMPT = ["--prompt", "hi", "--max-new-tokens", "4", "--temperature", "0"]
CLI_CASES = [
    ("missing --lora", lambda t: ["--lora", "/missing/file.pth", *PROMPT], ["--lora", "/missing/file.pth"]),
    ("--top-p 0", lambda t: ["--top-p", "0", *PROMPT], ["--top-p", "0"]),
    ("--top-p 1.5", lambda t: ["--top-p", "1.5", *PROMPT], ["--top-p", "1.5"]),
    ("--repetition-penalty 0", lambda t: ["--repetition-penalty", "0", *PROMPT],
     ["--repetition-penalty", "0"]),
    ("--temperature nan", lambda t: [*PROMPT, "--temperature", "nan"], ["--temperature", "nan"]),
    ("--temperature -1", lambda t: [*PROMPT, "--temperature", "-1"], ["--temperature", "-1"]),
    ("--top-k -1", lambda t: ["--top-k", "-1", *PROMPT], ["--top-k", "-1"]),
    ("--prompt not UTF-8", lambda t: ["--prompt", "\udcff hi", "--max-new-tokens", "4"],
     ["--prompt", "not UTF-8"]),
    ("--max-new-tokens abc", lambda t: ["--prompt", "hi", "--max-new-tokens", "abc"],
     ["--max-new-tokens", "abc"]),
    ("--max-new-tokens = context", lambda t: ["--prompt", "hi", "--max-new-tokens", "256"],
     ["--max-new-tokens 256", "context is 256"]),
    ("truncated --weights", lambda t: ["--weights", str(truncated(base_copy(t))), *PROMPT],
     ["--weights", "base.safetensors"]),
    ("pickled --weights", lambda t: ["--weights", str(pickled_payload(t / "w.pth")), *PROMPT],
     ["--weights", "w.pth", "weights_only"]),
    ("garbage --tokenizer", lambda t: ["--tokenizer", str(tokenizer_dir(t)), *PROMPT],
     ["--tokenizer", "tokenizer.json"]),
    ("NaN --lora", lambda t: ["--lora", str(nan_adapter(t)), *PROMPT], ["nan.safetensors", "non-finite"]),
    ("--lora for another model", lambda t: ["--lora", str(wrong_model_adapter(t)), *PROMPT],
     ["other.safetensors", "layers.0.q_proj"]),
]


@pytest.mark.parametrize("argv,words", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, argv, words):
    assert_one_line_error(chat, argv(tmp_path), capsys, words)


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # Python's stdin uses either, by locale
def test_chat_non_utf8_stdin(monkeypatch, capsys, errors):
    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\xfe hello\n"), encoding="utf-8", errors=errors)
    monkeypatch.setattr(sys, "stdin", stdin)
    assert chat.main(["--temperature", "0", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "standard input is not UTF-8" in err[0], err


def test_chat_non_utf8_stdin_subprocess(tmp_path):
    """The real thing once: bytes that are not UTF-8 piped into python -m minimind.chat."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                         os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "minimind.chat", "--max-new-tokens", "4"], input=b"\xff\xfe hi\n",
                          capture_output=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr.decode(errors="replace")
    err = done.stderr.decode(errors="replace").strip().splitlines()
    assert len(err) == 1 and "standard input is not UTF-8" in err[0], err


def test_chat_ctrl_c_is_130(monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(chat, "reply", interrupt)
    assert chat.main(PROMPT) == 130


def test_chat_unexpected_errors_keep_their_traceback(monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(chat, "reply", bug)
    with pytest.raises(ZeroDivisionError):
        chat.main(PROMPT)


def test_chat_shortens_the_answer_not_the_prompt(monkeypatch, capsys):
    seen = {}

    def fake_generate(model, ids, max_new_tokens, **kwargs):
        seen.update(prompt=ids[0].tolist(), max_new_tokens=max_new_tokens)
        return iter(())

    monkeypatch.setattr(chat, "stream_generate", fake_generate)
    question = "tell me everything about pandas " * 20
    assert chat.main(["--prompt", question, "--max-new-tokens", "200"]) == 0
    tokenizer = MiniMindTokenizer.from_pretrained()
    full = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True)
    assert 56 < len(full) < 256  # longer than 256 - 200 tokens, shorter than the context
    assert seen == {"prompt": full, "max_new_tokens": 256 - len(full)}
    assert f"limited to {256 - len(full)} new tokens" in capsys.readouterr().err
