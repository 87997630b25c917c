"""`breeze-stream bench-engine` on the CPU with the tiny shape (CI), and the capacity helpers."""

import json

import pytest
import torch

from bench.capacity import SimConfig, simulate
from bench.capacity import (
    main as capacity_main,  # breeze_stream.cli's main is the server's
)
from breeze_stream.cli import main
from engines.synthetic import SHAPES, WHISPER_SUPPRESS, random_engine, synthetic_vocabulary
from engines.weights.checkpoints import default_suppress_ids, default_vocabulary
from engines.whisper.tokenizer import Tokenizer


@pytest.fixture
def one_thread():
    """Tiny CPU timings: one intra-op thread avoids barrier stalls on a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bench_engine_cpu_tiny_writes_every_section(tmp_path, one_thread):
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench-engine",
            "--shape",
            "tiny",
            "--random-weights",
            "--device",
            "cpu",
            "--batch",
            "1",
            "--json",
            str(out),
            "--baseline",
            "hf",
            "--iters",
            "1",
            "--encoder-frames",
            "200",
            "--short-window",
            "0",
            "--frames",
            "100",
            "--drafts",
            "0,1",
            "--draft-batch",
            "1",
            "--step-steps",
            "1",
            "--repeats",
            "1",
            "--hf-steps",
            "2",
            "--sections",
            "encoder,decoder,verify,step,hf",
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["shape"] == "tiny" and report["dims"]["n_text_layer"] == SHAPES["tiny"].n_text_layer
    assert report["device"].startswith("cpu") and report["dtype"] == "float32" and report["date"] and report["command"]
    assert [r["batch"] for r in report["encoder"]] == [1] and all(r["ms_per_window"] > 0 for r in report["encoder"])
    assert [r["batch"] for r in report["decoder"]] == [1]
    assert all(r["eager_ms"] > 0 and r["tokens_per_s"] > 0 for r in report["decoder"])
    assert [r["draft"] for r in report["verification"]] == [0, 1]
    assert {r["draft"] for r in report["step"]} == {0, 8} and all(r["ms_per_step"] > 0 for r in report["step"])
    hf = report["hf"]
    assert [r["batch"] for r in hf["encoder"]] == [1] and [r["batch"] for r in hf["decoder"]] == [1]
    assert all(r["ms_per_step"] > 0 for r in hf["decoder"])


def test_bench_engine_needs_random_weights(capsys):
    assert main(["bench-engine", "--shape", "tiny", "--device", "cpu"]) == 2
    assert "--random-weights" in capsys.readouterr().err


def test_synthetic_vocabulary_has_the_special_ids_of_the_real_one():
    real, synthetic = default_vocabulary(), synthetic_vocabulary(51865)
    assert len(synthetic) == len(real)
    assert synthetic[50257:] == real[50257:]  # every special and timestamp token at its id
    a, b = Tokenizer(real), Tokenizer(synthetic)
    assert (a.eot, a.sot, a.transcribe, a.no_timestamps, a.no_speech, a.language_ids) == (
        b.eot,
        b.sot,
        b.transcribe,
        b.no_timestamps,
        b.no_speech,
        b.language_ids,
    )


def test_whisper_suppress_list_is_the_embedded_models():
    assert WHISPER_SUPPRESS == default_suppress_ids()


def test_capacity_simulation_runs_on_the_cpu(one_thread):
    """A few streams through the real Engine on a tiny random model: forced lengths, finals for
    every segment, accepted drafts (the rigged decoder repeats itself across partials)."""
    engine = random_engine("tiny", "cpu", torch.float32, tokens_per_second=None, max_batch=8, speculative="hypothesis")
    try:
        result = simulate(engine, SimConfig(streams=2, duration=3.0, warmup=0.5, rate=3.0))
    finally:
        engine.close()
    assert result["error_count"] == 0, result["errors"]
    assert result["finals"] >= 1 and result["final_latency_s"]["p50"] > 0
    assert result["looped_finals"] == 0
    assert result["final_tokens_mean"] > 0


def test_capacity_command_runs_each_seed_and_reports_the_spread(one_thread, tmp_path, capsys):
    out = tmp_path / "cap.json"
    assert (
        capacity_main(
            [
                "--shape",
                "tiny",
                "--device",
                "cpu",
                "--streams",
                "2",
                "--seeds",
                "0,1",
                "--duration",
                "2",
                "--warmup",
                "0.5",
                "--prewarm",
                "0:0",
                "--max-batch",
                "8",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert [(r["streams"], r["seed"]) for r in report["runs"]] == [(2, 0), (2, 1)]
    assert all(r["error_count"] == 0 and r["finals"] >= 1 for r in report["runs"])
    assert report["final_p95_s_by_streams"]["2"] == [r["final_latency_s"]["p95"] for r in report["runs"]]
    assert "final p95 over 2 seeds" in capsys.readouterr().out
