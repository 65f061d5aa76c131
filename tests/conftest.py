"""Test setup: without CUDA, run Triton kernels on Triton's CPU interpreter.

TRITON_INTERPRET must be set before anything imports triton, which is why it happens here, at the
top of the first file pytest loads.
"""
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
