"""Benchmarks of lora_kernels: kernels (``bench_lora_linear.py``), memory (``bench_memory.py``) and
end-to-end MiniMind LoRA training (``bench_train.py``), turned into tables by ``benchmarks.report``.

Run them with ``python -m pytest benchmarks/ --benchmark-only``; see ``benchmarks/README.md``.
"""
