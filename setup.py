"""Packaging for lora_kernels (fused LoRA kernels) and minimind (the bundled LoRA SFT trainer)."""
from setuptools import find_packages, setup

TEST_REQUIRES = [
    "pytest>=7",
    "pytest-benchmark>=4",
    "hypothesis>=6",
    "peft>=0.10",
    "safetensors>=0.4",
    "bitsandbytes>=0.49",  # checked against the NF4/int8 definitions; tests skip where it does not run
    "transformers>=4.40",  # the real-clients tests (PEFT pulls it in as well)
]
# Only for converting bitsandbytes layers (from_bitsandbytes, fuse_peft_model over Linear4bit/Linear8bitLt);
# our own NF4/int8 path needs none of it.
BITSANDBYTES_REQUIRES = ["bitsandbytes>=0.49"]

setup(
    name="lora-kernels",
    version="0.1.0",
    description="Fused Triton LoRA kernels for PyTorch, a drop-in LoRA linear, and a MiniMind LoRA SFT trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["lora_kernels", "lora_kernels.*", "minimind", "minimind.*"]),
    py_modules=["atomic_io"],  # crash-safe writes, shared by both packages
    include_package_data=True,
    package_data={"minimind": ["assets/*", "assets/**/*"]},
    install_requires=[
        # The supported range's lower ends are the oldest stack CI runs (torch 2.13, Triton 3.8); its upper
        # end is whatever the index serves newest, which CI installs on every run.
        "torch>=2.13",
        # Triton ships Linux wheels only; elsewhere the fused torch backend is used.
        'triton>=3.8; platform_system == "Linux"',
        "safetensors>=0.4",
        "tokenizers>=0.15",
        "tqdm>=4.60",
        "matplotlib>=3.5",
    ],
    extras_require={"test": TEST_REQUIRES, "bitsandbytes": BITSANDBYTES_REQUIRES},
    entry_points={
        "console_scripts": [
            "minimind-train-lora=minimind.train_lora:main",
            "minimind-chat=minimind.chat:main",
            "minimind-merge-lora=minimind.merge_lora:main",
        ]
    },
)
