"""lora_kernels.config: LoRAConfig (the defaults, the scaling rule, errors that name the value), the PEFT
pattern rules, and patterns that would make a backtracking regex engine hang."""
import json
import time

import pytest
import torch

from helpers import assert_unchanged, base_model, peft_dir, set_config, snapshot
from lora_kernels import (
    FusedLoRALinear,
    LoRAConfig,
    load_peft_adapter,
    replace_linear_with_fused_lora,
    save_peft_adapter,
)


# ---------------------------------------------------------------------------------------------------
# LoRAConfig


def test_config_derives_scaling_once():
    assert LoRAConfig(rank=4, alpha=8).scaling == 2.0
    assert LoRAConfig(rank=4, alpha=8, use_rslora=True).scaling == 4.0
    config = LoRAConfig(rank=16)
    assert (config.lora_alpha, config.scaling) == (16.0, 1.0)  # alpha None: MiniMind's unscaled LoRA
    assert config.replace(alpha=4).scaling == 0.25
    layer = FusedLoRALinear(8, 8, config=LoRAConfig(rank=2, alpha=6, dropout=0.1))
    assert (layer.rank, layer.alpha, layer.scaling, layer.dropout) == (2, 6.0, 3.0, 0.1)
    layer.alpha = 2.0  # the old attribute still works, through the config
    assert layer.scaling == 1.0 and layer.lora_configs["default"].alpha == 2.0


@pytest.mark.parametrize("kwargs,words", [
    ({"rank": 0}, "rank must be an integer >= 1, got 0"),
    ({"rank": 2.0}, "rank must be an integer >= 1, got 2.0"),
    ({"alpha": float("nan")}, "alpha must be a finite number > 0 .*nan"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ({"use_rslora": 1}, "use_rslora must be True or False, got 1"),
    ({"init": "xavier"}, "init must be one of .* got 'xavier'"),
    ({"rank_pattern": {"(.*.*)*X": 4}}, r"rank_pattern key '\(\.\*\.\*\)\*X'.*forever"),
    ({"rank_pattern": {"mlp": "8"}}, r"rank_pattern\['mlp'\] must be an integer >= 1, got '8'"),
    ({"alpha_pattern": {"mlp": 0}}, r"alpha_pattern\['mlp'\] must be a finite number > 0, got 0"),
])
def test_config_errors_name_the_value(kwargs, words):
    with pytest.raises(ValueError, match=words):
        LoRAConfig(**kwargs)


def test_config_and_separate_arguments_are_not_mixed():
    with pytest.raises(TypeError, match="either config"):
        FusedLoRALinear(8, 8, rank=4, config=LoRAConfig(rank=2))


def test_for_module_follows_peft_pattern_rules():
    config = LoRAConfig(rank=4, rank_pattern={"q_proj": 8, r"layers\.1\..*": 2}, alpha_pattern={"up_proj": 3})
    assert config.for_module("layers.0.q_proj").rank == 8            # a suffix after a dot
    assert config.for_module("layers.1.q_proj").rank == 8            # the first matching key wins
    assert config.for_module("layers.1.up_proj").rank == 2           # a regex
    assert config.for_module("layers.0.xq_proj").rank == 4           # not after a dot: no match
    up = config.for_module("layers.0.up_proj")
    assert (up.rank, up.alpha) == (4, 3.0) and not up.rank_pattern
    # alpha None (alpha = rank) stays None: a pattern-chosen rank keeps scaling 1.
    assert config.for_module("layers.0.q_proj").scaling == 1.0


# ---------------------------------------------------------------------------------------------------
# Patterns that would make a backtracking regex engine hang


@pytest.mark.parametrize("key", ["(.*.*.*)*X", "(a+)+b", "(q|qq)*_proj", r"(\w+)\1", ".*.*.*.*X", "x" * 2000])
def test_hostile_rank_pattern_fails_within_a_second(tmp_path, key):
    directory = peft_dir(tmp_path, config=set_config(rank_pattern={key: 4}))
    model = base_model()
    before = snapshot(model)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="rank_pattern key"):
        load_peft_adapter(model, directory)
    assert time.perf_counter() - start < 1.0
    assert_unchanged(model, before)


def test_regex_patterns_peft_writes_still_apply(tmp_path):
    """The bound refuses only risky patterns: a real regex key still selects its layers."""
    model = base_model()
    torch.manual_seed(0)
    replace_linear_with_fused_lora(model, rank=4, alpha=8, target_modules="all-linear")
    save_peft_adapter(model, tmp_path / "p")
    config_path = tmp_path / "p" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["alpha_pattern"] = {r"layers\.1\..*_proj": 2}
    config_path.write_text(json.dumps(config))
    loaded = load_peft_adapter(base_model(), tmp_path / "p")
    assert loaded.layers[1].up_proj.alpha == 2 and loaded.layers[1].q_proj.alpha == 2
    assert loaded.layers[0].up_proj.alpha == 8
