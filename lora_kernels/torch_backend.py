"""The older path of the fused pure-PyTorch backend, kept so that existing imports work: everything lives in
:mod:`lora_kernels.backends.torch`."""
from .backends.torch import (  # noqa: F401 - re-exported
    DEFAULT,
    KERNEL_MASK,
    DropoutP,
    Scaling,
    TorchBackend,
    backward,
    dropout_mask,
    effective_dropout_p,
    forward,
    hash_threshold,
)
