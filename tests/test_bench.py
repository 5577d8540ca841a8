"""launch/bench.py: --json prints one JSON object on stdout, whatever the benchmark prints."""

from __future__ import annotations

import json
import os
import sys

import pytest

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


STEP_FIELDS = {
    "precision",
    "batch",
    "image_inner_steps_per_s",
    "tflops",
    "mfu",
    "peak_memory_gb",
    "inner_step_ms",
    "share",
    "host_syncs_per_inner_step",
}


def test_gpu_benchmark_quick_runs_on_a_cpu_with_the_fields_of_a_gpu_run(capfd):
    bench = load_script("bench")
    with process_state():
        assert bench.main(["gpu", "--quick", "--json", "--peak-tflops", "1.5"]) == 0
    out, err = capfd.readouterr()
    result = json.loads(out)
    assert "bench gpu: trainer" in err  # each part's numbers as it ends
    assert result["quick"] and result["preset"] == "demo32"
    assert result["peak_tflops"] == 1.5 and result["peak_source"] == "--peak-tflops"
    assert result["planner_batch"] == 128  # configs/big.json's per-GPU batch
    assert result["flops_per_image_inner_step"] > 0
    assert set(result["steps"]) == {"fp32_b2", "fp32_b4", "bf16_b2", "bf16_b4"}
    layers = result["steps"]["bf16_b4"].pop("generator_forward_layers_ms")
    assert len(layers) == 10 and all(ms > 0 for ms in layers.values())
    assert list(layers.values()) == sorted(layers.values(), reverse=True)
    for case in result["steps"].values():
        assert set(case) == STEP_FIELDS, case
        assert case["inner_step_ms"] > 0 and case["tflops"] > 0
        assert case["mfu"] == pytest.approx(case["tflops"] / 1.5, rel=1e-3)
        assert set(case["share"]) == {"latent_nets", "generator", "loss", "optimizers"}
        assert 0.9 < sum(case["share"].values()) < 1.1
        assert case["host_syncs_per_inner_step"] is None  # nothing synchronises on a CPU
    layout = result["layout"]
    for key in ("contiguous_ms", "channels_last_ms", "channels_last_cudnn_benchmark_ms"):
        assert layout[key] > 0
    assert layout["compiled_ms"] is None and "skipped" in layout["compile_error"]
    trainer = result["trainer"]
    assert "error" not in trainer, trainer
    assert trainer["trainer_ms_per_batch"] > 0 and trainer["bare_ms_per_batch"] > 0
    assert trainer["paging_vs_on_device"] >= 1.0
    assert 0 < trainer["latent_paging_share"] < 1
    restoration = result["restoration"]
    assert restoration["images_per_s"] > 0 and restoration["dip_seconds_per_image"] > 0
    assert restoration["timed_iterations"] == restoration["iterations"] == 5
    assert set(result["summary"]) == {
        "mfu_bf16_planner_batch",
        "tflops_bf16_planner_batch",
        "trainer_vs_bare",
        "paging_vs_on_device",
        "host_syncs_per_inner_step_trainer",
        "host_syncs_per_iteration_restoration",
    }
    assert result["summary"]["mfu_bf16_planner_batch"] == result["steps"]["bf16_b4"]["mfu"]


def test_bench_options_belong_to_the_gpu_benchmark(capsys):
    bench = load_script("bench")
    with pytest.raises(SystemExit) as exit_:
        bench.main(["store", "--quick"])
    assert exit_.value.code == 2
    assert "apply to the gpu benchmark only" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["store", "--keep-freed-memory"], "apply to scale --train only"),
        (["scale", "--train", "--images", "0"], "--images must be larger than the 10,000"),
    ],
)
def test_scale_train_options_are_checked_before_anything_runs(capsys, argv, message):
    bench = load_script("bench")
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.dist
def test_fit_benchmark_fits_on_one_and_two_processes_with_equal_results():
    from lcm_dist.benchmarks.fit import bench_fit

    result = bench_fit(images=32, iterations=1, batch_size=8)
    assert result["images_per_s_1"] > 0 and result["images_per_s_2"] > 0
    assert result["speedup"] == pytest.approx(
        result["images_per_s_2"] / result["images_per_s_1"], abs=1e-3
    )
    assert result["max_abs_diff"] == 0.0  # the units do not depend on the number of processes


@pytest.mark.slow
@pytest.mark.dist
def test_epoch_benchmark_trains_every_row_once_and_moves_each_chunk_once_per_epoch():
    from lcm_dist.benchmarks.epoch import bench_scale_train

    result = bench_scale_train(small=2048, large=8192, batch=256)
    assert result["rows_once_8192"] and result["rows_once_2048"]
    assert result["steps_2048"] >= result["steps_8192"]  # the small set runs as many steps
    assert result["epochs_2048"] > 2
    for n in (2048, 8192):
        assert result[f"epoch0_bytes_written_{n}"] == result[f"store_bytes_{n}"]
        assert result[f"io_amplification_{n}"] == 1.0
    assert result["rss_ratio"] > 0 and result["images_per_s_8192"] > 0
    assert len(result["peak_rss_bytes_8192_per_rank"]) == 2
    assert result["malloc"].startswith("mmap threshold")  # peak RSS is the memory in use
    assert not result["keeps_freed_memory_8192"] and not result["keeps_freed_memory_2048"]


@pytest.mark.slow
@pytest.mark.dist
def test_resume_benchmark_reads_each_checkpoint_file_once_across_processes():
    from lcm_dist.benchmarks.resume import bench_resume

    result = bench_resume(rounds=1)
    assert result["bytes_read_own_share"] == result["checkpoint_bytes"]
    assert result["bytes_read_all_files"] == 8 * result["checkpoint_bytes"]
    assert result["seconds_all_files"] > 0 and result["seconds_own_share"] > 0
