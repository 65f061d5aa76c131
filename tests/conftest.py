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

# Property tests draw the same examples on every run (CI must not go red at random); set
# HYPOTHESIS_PROFILE=explore locally to search new examples.
try:
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
    _hypothesis_settings.register_profile("explore", derandomize=False, max_examples=400)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover - hypothesis is a test requirement
    pass
