"""Test setup: without CUDA, run Triton kernels on Triton's CPU interpreter.

TRITON_INTERPRET must be set before anything imports triton, which is why it happens here, at the
top of the first file pytest loads.
"""
import json
import os
import sys
from pathlib import Path

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `import helpers` from test files, whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402 - after TRITON_INTERPRET and the path above

from helpers import save_tiny_base, write_data  # noqa: E402

# Property tests draw the same examples on every run (CI must not go red at random); set
# HYPOTHESIS_PROFILE=explore locally to search new examples.
try:
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
    _hypothesis_settings.register_profile("explore", derandomize=False, max_examples=400)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover - hypothesis is a test requirement
    pass


@pytest.fixture
def long_prompt_data(tmp_path):
    """SFT data whose answers all start after token 8 (tmp_path / "long_prompts.jsonl")."""
    path = tmp_path / "long_prompts.jsonl"
    rows = [{"conversations": [{"role": "user", "content": "please tell me a long story " * 4},
                               {"role": "assistant", "content": "ok"}]}] * 3
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bundled():
    """(the bundled base model, its tokenizer); skips where they are not built."""
    from minimind.checkpoint import BUNDLED_BASE, load_minimind
    from minimind.tokenizer import BUNDLED_TOKENIZER, MiniMindTokenizer

    if not BUNDLED_BASE.is_file() or not (BUNDLED_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("bundled base model not built (python -m minimind.pretrain)")
    return load_minimind(), MiniMindTokenizer.from_pretrained()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The trainer's inputs: a random tiny base (``base.safetensors``) and a small identity data set
    (``data.jsonl``), in one folder per test module."""
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_base(root / "base.safetensors")
    write_data(root / "data.jsonl")
    return root
