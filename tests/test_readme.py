"""Every Python block of README.md and benchmarks/README.md runs as written.

A block may use, without defining them, only the objects the README's Usage section names (``model``,
``linear``, ...): they are built here, small, on the CPU. Everything else (every import) must be in the
block itself, so a pasted block never misses one. Files a block reads (the adapters of the Quickstart run,
an adapter file) are made first, in a temporary working directory.
"""
import ast
import builtins
import copy
import importlib.util
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helpers import ROOT, TRANSFORMERS_TINY, tiny_transformers

DOCUMENTS = ("README.md", "benchmarks/README.md")
VOCAB = TRANSFORMERS_TINY["vocab_size"]

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),  # transformers via peft
    pytest.mark.filterwarnings("ignore:rank .* >= in\\*out:UserWarning"),  # rank 16 on the tiny model's layers
]


def python_blocks():
    """(document, line of the opening fence, source) of every ```python block."""
    found = []
    for document in DOCUMENTS:
        text = (ROOT / document).read_text(encoding="utf-8")
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            found.append((document, text[:match.start()].count("\n") + 1, match.group(1)))
    return found


def _names(source: str):
    """(names the block reads, names it binds: imports, assignments, definitions)."""
    tree = ast.parse(source)
    bound = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
    read = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return read, bound


def free_names(source: str) -> set:
    """The names a block reads and never binds: each must be one of the README's given objects."""
    read, bound = _names(source)
    return read - bound - set(dir(builtins))


def given_names(source: str) -> set:
    """The given objects a block reads (``model = replace_linear_with_fused_lora(model, ...)`` rebinds one)."""
    return _names(source)[0] & set(FIXTURES)


def tiny_llama():
    return tiny_transformers("llama").eval()


def _peft_model():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(4, 64, generator=g), "W": torch.randn(32, 64, generator=g) / 8,
            "b": torch.randn(32, generator=g), "A": torch.randn(8, 64, generator=g) / 8,
            "B": torch.randn(32, 8, generator=g) / 8}


# The objects the README's Usage section names, each built on demand.
FIXTURES = {
    "model": tiny_llama,
    "fresh_model": tiny_llama,
    "base": tiny_llama,
    "peft_model": _peft_model,
    "linear": lambda: nn.Linear(64, 32),
    "input_ids": lambda: torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(1)),
    **{name: (lambda name=name: _tensors()[name]) for name in "xWbAB"},
}


def _make_files(directory: Path) -> None:
    """The files blocks read: an adapter for the tiny model, and the Quickstart run's two MiniMind adapters."""
    from lora_kernels import replace_linear_with_fused_lora, save_lora
    from minimind.checkpoint import load_minimind
    from minimind.lora_io import save_minimind_lora

    torch.manual_seed(2)
    save_lora(replace_linear_with_fused_lora(tiny_llama(), rank=4, target_modules="all-linear"),
              directory / "lora_translation.safetensors")
    (directory / "out" / "lora").mkdir(parents=True)
    base = load_minimind()
    for name in ("identity", "terse"):
        adapted = replace_linear_with_fused_lora(copy.deepcopy(base), rank=4)
        save_minimind_lora(adapted, directory / "out" / "lora" / f"lora_{name}_128.pth")


BLOCKS = python_blocks()


def test_the_readmes_have_python_blocks():
    assert len([b for b in BLOCKS if b[0] == "README.md"]) >= 8  # the extraction finds them (a regex can rot)


def test_every_name_a_block_takes_as_given_is_named_in_the_usage_section():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    usage = text[text.index("## Usage"):text.index("### Any PyTorch model")]
    assert "tests/test_readme.py" in usage
    for document, line, source in BLOCKS:
        for name in sorted(free_names(source)):
            assert name in FIXTURES, f"{document}:{line}: {name!r} is neither imported nor defined in the block"
        for name in sorted(given_names(source)):
            assert f"`{name}`" in usage, f"{name!r} is used as given but the Usage section does not name it"


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None or importlib.util.find_spec("peft") is None,
                    reason="the README's blocks work on transformers and PEFT models (pip install -e '.[test]')")
@pytest.mark.parametrize("document,line,source", BLOCKS, ids=[f"{d}:{line}" for d, line, _ in BLOCKS])
def test_block_runs_as_written(document, line, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _make_files(tmp_path)
    namespace = {name: FIXTURES[name]() for name in given_names(source)}
    exec(compile(source, f"{document}:{line}", "exec"), namespace)  # noqa: S102 - our own README
