"""benchmarks/serve_adapters.py on a tiny MiniMind, one round: every provider does the same work, and those that
run each prompt through its own adapter (ours batched, the loop over adapters, PEFT's adapter_names) give the same
greedy tokens."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest tests` (not `python -m pytest`) does not put the repo root on the path
    sys.path.insert(0, str(ROOT))

from benchmarks import serve_adapters  # noqa: E402
from minimind.model import MiniMindConfig, MiniMindForCausalLM  # noqa: E402
from minimind.tokenizer import MiniMindTokenizer  # noqa: E402


@pytest.mark.parametrize("targets", ["square", "all-linear"])
def test_providers_generate_the_same_tokens(targets):
    tok = MiniMindTokenizer.from_pretrained()

    def base():
        torch.manual_seed(0)
        return MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2, intermediate_size=96,
                                                  vocab_size=tok.vocab_size, max_position_embeddings=128)).eval()

    ranks = [4, 8, 12, 16, 24, 32]
    prompts = [f"question {i}" + " and more" * (i % 5) for i in range(2 * len(ranks))]
    result = serve_adapters.measure(base, tok, len(ranks), ranks, new_tokens=5, rounds=1, prompts_per_adapter=2,
                                    targets=targets, prompts=prompts)
    providers = set(serve_adapters.PROVIDERS) - set(result["skipped"])
    assert set(result["tokens"]) == providers and set(result["seconds"]) == providers
    assert all(t.shape == (12, 5) for t in result["tokens"].values())  # the same work: 12 prompts x 5 tokens
    for name in set(serve_adapters.SAME_TOKENS) & providers - {"batched"}:
        assert torch.equal(result["tokens"][name], result["tokens"]["batched"]), name
        assert result["mismatched_rows"][name] == 0
    assert result["adapters_matter"] >= 6  # most prompts answer otherwise through a0 alone
    assert result["generated"] == 60 and result["ranks"] == ranks
    rows = serve_adapters.summarise(result)
    assert [r["provider"] for r in rows] == [p for p in serve_adapters.PROVIDERS if p in providers]
    assert next(r for r in rows if r["provider"] == "batched")["speed_vs_batched"] == 1.0
    table = serve_adapters.render_table(rows)
    summary = serve_adapters.render_summary({6: rows}, 16)
    assert len(table) == 2 + len(rows) and summary[2].startswith("| 6 | 16 | ")


def test_peft_is_skipped_with_a_reason_without_peft(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    assert serve_adapters.peft_twin(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), ["a0"]) is None
