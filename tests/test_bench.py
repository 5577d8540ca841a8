"""launch/bench.py: --json prints one JSON object on stdout, whatever the benchmark prints."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

from tests.conftest import REPO


def test_json_output_is_only_the_json_object(monkeypatch, capfd):
    from lcm_dist import benchmarks

    def noisy():
        print("lcm-dist: a training log line")
        os.system("echo a line from a subprocess")
        print("a warning", file=sys.stderr)
        return {"ratio": 1.5}

    monkeypatch.setitem(benchmarks.BENCHMARKS, "noisy", noisy)
    spec = importlib.util.spec_from_file_location("bench", REPO / "launch" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    assert bench.main(["noisy", "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out) == {"ratio": 1.5}
    assert "a training log line" in err and "a line from a subprocess" in err

    assert bench.main(["noisy"]) == 0
    out, _ = capfd.readouterr()
    assert "ratio  1.5" in out
