"""launch/bench.py: --json prints one JSON object on stdout, whatever the benchmark prints."""

from __future__ import annotations

import json
import os
import sys

from tests.helpers import load_script, process_state


def test_json_output_is_only_the_json_object(monkeypatch, capfd):
    from lcm_dist import benchmarks

    def noisy():
        print("lcm-dist: a training log line")
        os.system("echo a line from a subprocess")
        print("a warning", file=sys.stderr)
        return {"ratio": 1.5}

    monkeypatch.setitem(benchmarks.BENCHMARKS, "noisy", noisy)
    bench = load_script("bench")

    assert bench.main(["noisy", "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out) == {"ratio": 1.5}
    assert "a training log line" in err and "a line from a subprocess" in err

    assert bench.main(["noisy"]) == 0
    out, _ = capfd.readouterr()
    assert "ratio  1.5" in out


def test_step_benchmark_compares_the_trainer_with_a_bare_loop_locally_and_on_s3(monkeypatch):
    from lcm_dist.benchmarks import step

    monkeypatch.setattr(step, "WARMUP", 1)
    monkeypatch.setattr(step, "PAIRS", 2)
    with process_state():
        result = step.bench_step(images=64, presets=("demo32",), inner=(1,))
    json.dumps(result)  # what --json prints: it must be JSON
    assert set(result["cases"]) == {"demo32_inner1_local", "demo32_inner1_s3"}
    for case in result["cases"].values():
        assert case["trainer_ms"] > 0 and case["bare_ms"] > 0
        assert (
            case["ratio"] == round(case["trainer_ms"] / case["bare_ms"], 3)
            or abs(case["ratio"] - case["trainer_ms"] / case["bare_ms"]) < 0.01
        )
    assert result["trainer_vs_bare"] == result["cases"]["demo32_inner1_local"]["ratio"]
    assert result["trainer_vs_bare_s3"] == result["cases"]["demo32_inner1_s3"]["ratio"]
