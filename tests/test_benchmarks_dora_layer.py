"""benchmarks/dora_layer.py's bookkeeping on synthetic timings: interleaving, per-round ratios, the table."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest tests` (not `python -m pytest`) does not put the repo root on the path
    sys.path.insert(0, str(ROOT))

from benchmarks import dora_layer  # noqa: E402


def test_rounds_interleave_the_steps_in_rotated_order_with_resets_outside_the_timer():
    events, now = [], [0.0]

    def clock():
        return now[0]

    def step(name, seconds):
        def run():
            events.append(name)
            now[0] += seconds
        return run

    def reset(name):
        def run():
            events.append(f"reset {name}")
            now[0] += 100.0  # must not reach the samples
        return run

    steps = {"a": step("a", 1.0), "b": step("b", 2.0), "c": step("c", 3.0)}
    samples = dora_layer.interleaved_times(steps, rounds=3, warmup=1, reset={n: reset(n) for n in steps},
                                             clock=clock)
    assert [e for e in events if not e.startswith("reset")] == list("abc" "abc" "bca" "cab")  # warm-up, 3 rounds
    assert all(events[i] == f"reset {events[i + 1]}" for i in range(0, len(events), 2))
    assert samples == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [3.0] * 3}
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        dora_layer.interleaved_times(steps, rounds=0)


def test_time_ratio_is_the_median_of_per_round_ratios_not_the_ratio_of_medians():
    # Round 3 was slow for the baseline only: per round 2, 2, 5 -> 2; the medians' ratio would say 8 / 2 = 4.
    samples = {"torch": [1.0, 4.0, 2.0], "torch_dora": [2.0, 8.0, 10.0]}
    saved = {"torch": 2 ** 20, "torch_dora": 3 * 2 ** 20}
    rows = {r.provider: r for r in dora_layer.summarise(samples, "torch", saved)}
    assert rows["torch_dora"].ratio == pytest.approx(2.0) and rows["torch_dora"].median_s == pytest.approx(8.0)
    assert rows["torch"].ratio == pytest.approx(1.0)
    assert all(r.ratio is None for r in dora_layer.summarise(samples, "missing"))
    families = dora_layer.dora_over_lora(list(rows.values()) + [dora_layer.Row("peft", 1.0, None, 0)],
                                         {**samples, "peft": [1.0] * 3}, backend="torch")
    assert families == {"ours_time": pytest.approx(2.0), "ours_bytes": pytest.approx(3.0)}  # no peft_dora: no PEFT


def test_table_shows_ms_ratios_and_mib_and_marks_what_is_missing():
    rows = [dora_layer.Row("torch", 0.050, 1.0, 2 ** 20), dora_layer.Row("torch_dora", 0.0625, 1.25, 2 * 2 ** 20),
            dora_layer.Row("peft_dora", 0.1, None, None)]
    lines = dora_layer.render_table(rows, "torch")
    assert lines[0].startswith("| provider | what | median ms | time / `torch` | kept for backward MiB |")
    assert ("| `torch_dora` | ours: DoRA (`FusedLoRALinear(use_dora=True)`, torch backend) | 62.5 | 1.25 | 2.00 "
            "| 2.00 |") in lines
    assert lines[-1] == "| `peft_dora` | PEFT `lora.Linear`, `use_dora=True` | 100.0 | – | – | – |"
