"""`breeze-stream bench-engine`: encoder and decoder speed of the engine on random weights.

Speed does not depend on the weights' values, so a model of an exact shape (Breeze-ASR-25 is
Whisper large-v2's) is built with random weights on the device, nothing is downloaded. Reported,
in one JSON file:

- encoder: ms per call and per 30 s window, by batch (and a shortened window);
- decoder: ms per step by batch, without CUDA graphs (the same bucketed step run eagerly), as
  CUDA graphs, and (optionally, `--modes ...,compile`) Inductor-compiled into a graph; for full 30 s
  cross-attention and for a shortened window; tokens/s = batch / step time; a floor from the
  bytes a step must read at the measured copy bandwidth;
- verification: one forward's cost against draft length (width = draft + 1);
- step: the running batch's whole step (host-side inputs, graph replay, token rules, argmax),
  i.e. what the engine pays per step;
- hf: Hugging Face transformers' WhisperForConditionalGeneration on the same shape and dtype,
  eager (its encoder, and a decoder step with its own cache), in the same run (`--baseline hf`);
- check: graph replay against the eager step on identical inputs (max |difference| of logits).

The GPU figures go to BENCHMARKS.md with the device, date and command. The CPU form with
`--shape tiny` runs in CI in seconds (tests/test_bench_engine.py). This module imports no
server dependency: on a bare GPU box run `python -m bench.engine ...`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.options import add_bench_arguments
from engines.gpu.cuda_graphs import GraphOptions, StepRunner
from engines.gpu.step_inputs import step_inputs
from engines.synthetic import SHAPES, random_model, synthetic_vocabulary
from engines.whisper.model import KVCache, ModelDims, Whisper

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
STEP_MODES = {  # decoder step variants timed side by side (--modes); graphs recorded before they are timed
    "eager": GraphOptions(mode="eager", row_kernels=False),  # the bucketed step run directly
    # PyTorch's kernels (cuBLAS, cuDNN attention) under one CUDA graph: the plain baseline
    "graph": GraphOptions(mode="graph", row_kernels=False, attention_kernel=False, record_in_background=False),
    # our Triton kernels, graphed: row kernels up to 16 rows, the self-attention kernel beyond (the engine's default)
    "kernels": GraphOptions(mode="graph", row_kernels=True, attention_kernel=True, record_in_background=False),
    "compile": GraphOptions(
        mode="compile", row_kernels=False, record_in_background=False
    ),  # Inductor-fused regions, graphed
}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# -- building -------------------------------------------------------------------------------------

# -- timing ---------------------------------------------------------------------------------------


class Timer:
    def __init__(self, device: torch.device, repeats: int = 5):
        self.device = device
        self.cuda = device.type == "cuda"
        self.repeats = repeats

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn, iters: int = 20, repeats: int | None = None, warmup: int = 2) -> float:
        """Median over `repeats` of the mean ms per call of `iters` back-to-back calls."""
        repeats = min(repeats or self.repeats, self.repeats)
        warmup = min(warmup, self.repeats)
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / iters)
            else:
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                times.append((time.perf_counter() - t0) * 1000 / iters)
        return statistics.median(times)


def copy_bandwidth(device: torch.device, timer: Timer) -> float | None:
    """GB/s of a large device-to-device copy (bytes read + written), the memory floor's rate."""
    if device.type != "cuda":
        return None
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device).random_()
    b = torch.empty_like(a)
    ms = timer(lambda: b.copy_(a), iters=10)  # a and b (2 GiB) are freed on return
    return 2 * (1 << 30) / ms / 1e6


def decoder_bytes(
    dims: ModelDims, batch: int, width: int, frames: int, context: int, itemsize: int
) -> dict[str, float]:
    """Bytes one decoder step must read: weights once (token embedding for the logits too), the
    cross-attention keys/values of every row, the self-attention keys/values read."""
    d, layers = dims.n_text_state, dims.n_text_layer
    weights = layers * (4 * d * d * 2 + 8 * d * d) + dims.n_vocab * d  # self + cross attention, MLP, embedding
    return {
        "weights": weights * itemsize,
        "cross_kv": batch * layers * 2 * frames * d * itemsize,
        "self_kv": batch * layers * 2 * context * d * itemsize,
    }


# -- sections -------------------------------------------------------------------------------------


@torch.inference_mode()
def bench_encoder(
    model: Whisper,
    batches: list[int],
    mel_frames: int,
    short_window: float,
    timer: Timer,
    iters: int,
    dtype,
    fused: bool = False,
) -> list[dict]:
    out = []
    shapes = [(b, mel_frames) for b in batches]
    if short_window:
        short = min(mel_frames, int(round(short_window * 100 / 2)) * 2)
        shapes += [(b, short) for b in (batches[0], max(batches))]
    graphed = None
    if model.device.type == "cuda":
        from engines.gpu.encoder_graphs import GraphedEncoder

        graphed = GraphedEncoder(model.encoder, batch_buckets=tuple(sorted(set(batches))))
        if fused:  # Inductor-fused blocks (the engine's "compile" mode), graphed as well
            from engines.gpu.fused import FusedEncoder

            fused = GraphedEncoder(FusedEncoder(model.encoder), batch_buckets=tuple(sorted(set(batches))))
    for b, frames in shapes:
        mel = torch.randn(b, model.dims.n_mels, frames, device=model.device, dtype=dtype)
        n = max(1, iters // 4) if b > 8 else iters
        ms = timer(lambda mel=mel: model.encoder(mel), iters=n, repeats=3)
        row = {"batch": b, "mel_frames": frames, "seconds": frames / 100, "ms_per_call": ms, "ms_per_window": ms / b}
        if graphed is not None:
            row["graph_ms_per_call"] = timer(lambda mel=mel: graphed(mel), iters=n, repeats=3)
            row["graph_ms_per_window"] = row["graph_ms_per_call"] / b
            if fused:
                row["fused_ms_per_call"] = timer(lambda mel=mel: fused(mel), iters=n, repeats=3)
                row["fused_ms_per_window"] = row["fused_ms_per_call"] / b
                row["fused_max_abs_diff"] = (fused(mel).float() - graphed(mel).float()).abs().max().item()
        out.append(row)
        print(
            f"encoder batch {b:3d} {frames / 100:5.1f} s: {ms:8.2f} ms/call {ms / b:7.2f} ms/window"
            + (f"  graphed {row['graph_ms_per_window']:7.2f} ms/window" if graphed is not None else "")
            + (f"  fused {row['fused_ms_per_window']:7.2f} ms/window" if "fused_ms_per_window" in row else ""),
            flush=True,
        )
        del mel
    return out


@torch.inference_mode()
def bench_sampled(
    model: Whisper, batches: list[int], clips: list[float], stride: int, timer: Timer, iters: int, dtype
) -> list[dict]:
    """Full windows with their padding sampled (a final's encoder call), per clip length: graphed
    on a GPU with the engine's 1 s bucket of dense positions, eager on the CPU."""
    from engines.whisper.sampled import SampledEncoder, dense_positions

    sampled = SampledEncoder(model.encoder, stride)
    run = sampled
    if model.device.type == "cuda":
        from engines.gpu.encoder_graphs import GraphedEncoder

        run = GraphedEncoder(sampled, batch_buckets=tuple(sorted(set(batches))))
    out = []
    for seconds in clips:
        dense = dense_positions(round(seconds * 100), bucket=50 if model.device.type == "cuda" else 1)
        for b in batches:
            mel = torch.randn(b, model.dims.n_mels, 2 * dense, device=model.device, dtype=dtype)
            ms = timer(lambda mel=mel: run(mel), iters=max(1, iters // 4) if b > 8 else iters, repeats=3)
            out.append({"batch": b, "clip_seconds": seconds, "dense": dense, "stride": stride, "ms_per_call": ms})
            print(f"sampled window batch {b:3d} clip {seconds:4.1f} s (dense {dense}): {ms:8.2f} ms/call", flush=True)
    return out


class _Pools:
    """The pools of a running batch (rows = the largest batch), filled with random values."""

    def __init__(self, model: Whisper, rows: int):
        dims = model.dims
        self.cache = KVCache(dims, rows, model.dtype, model.device)
        head_dim = dims.n_text_state // dims.n_text_head
        shape = (dims.n_text_layer, rows, dims.n_text_head, dims.n_audio_ctx, head_dim)
        self.cross_k = torch.randn(shape, dtype=model.dtype, device=model.device)
        self.cross_v = torch.randn(shape, dtype=model.dtype, device=model.device)
        self.cache.k.normal_()
        self.cache.v.normal_()


def _chain_inputs(batch: int, width: int, position: int, n_ctx: int, n_vocab: int, rng: np.random.Generator):
    class T:  # a chain draft of width - 1 tokens after the last token
        def __init__(self, tokens):
            self.tokens = tokens
            self.parents = list(range(-1, len(tokens) - 1))
            self.depth = list(range(len(tokens)))

    trees = [T(rng.integers(0, 50000, width).tolist()) for _ in range(batch)]
    return step_inputs(trees, [position] * batch, width, n_ctx, 0)


@torch.inference_mode()
def bench_decoder(
    model: Whisper,
    pools: _Pools,
    batches: list[int],
    widths: list[int],
    frames_list: list[int],
    modes: list[str],
    compile_batches: list[int],
    position: int,
    timer: Timer,
    iters: int,
    label: str,
    copy_gbps: float | None,
    check: dict,
) -> list[dict]:
    """ms per decoder step by (batch, width, frames) in each mode, on identical inputs."""
    dims = model.dims
    rng = np.random.default_rng(0)
    runners = {
        mode: StepRunner(model, pools.cache, pools.cross_k, pools.cross_v, replace(STEP_MODES[mode], width_buckets=()))
        for mode in modes
    }
    rows = []
    for frames in frames_list:
        for width in widths:
            for b in batches:
                inputs = _chain_inputs(b, width, position, dims.n_text_ctx, dims.n_vocab, rng)
                row = {
                    "table": label,
                    "batch": b,
                    "width": width,
                    "draft": width - 1,
                    "frames": frames,
                    "position": position,
                }
                results = {}
                for mode, runner in runners.items():
                    if mode == "compile" and b not in compile_batches:
                        continue
                    key = runner.prepare(*inputs, [frames] * b)
                    row["bucket"] = list(key[:4])
                    if mode == "eager":
                        fn = lambda runner=runner, key=key: runner.body(key)  # noqa: E731
                    else:
                        t0 = time.perf_counter()
                        fn = runner._step_fn(key)
                        row[f"{mode}_setup_s"] = round(time.perf_counter() - t0, 3)
                    row[f"{mode}_ms"] = timer(fn, iters=iters)
                    fn()
                    timer.sync()
                    results[mode] = runner._io(key[0], key[1]).logits[:b].float().clone()
                if "eager" in results:
                    for mode in ("graph", "kernels", "compile"):
                        if mode in results:
                            diff = (results[mode] - results["eager"]).abs().max().item()
                            check.setdefault(f"{mode}_vs_eager_max_abs_logit_diff", 0.0)
                            check[f"{mode}_vs_eager_max_abs_logit_diff"] = max(
                                check[f"{mode}_vs_eager_max_abs_logit_diff"], diff
                            )
                            same = bool((results[mode].argmax(-1) == results["eager"].argmax(-1)).all())
                            check[f"{mode}_vs_eager_argmax_equal"] = (
                                check.get(f"{mode}_vs_eager_argmax_equal", True) and same
                            )
                best = (
                    min(v for k, v in row.items() if k.endswith("_ms") and k != "eager_ms")
                    if len(runners) > 1
                    else row.get("eager_ms")
                )
                row["tokens_per_s"] = b * width / best * 1000 if width == 1 else None
                row["sequences_per_s"] = b / best * 1000
                context = row["bucket"][3]
                nbytes = decoder_bytes(dims, b, width, frames, context, model.dtype.itemsize)  # the rows' own frames
                row["bytes_gb"] = round(sum(nbytes.values()) / 1e9, 3)
                if copy_gbps:
                    row["floor_ms"] = sum(nbytes.values()) / copy_gbps / 1e6
                rows.append(row)
                print(
                    f"{label:8s} batch {b:3d} width {width:2d} frames {frames:4d}: "
                    + " ".join(f"{m} {row[m + '_ms']:7.3f} ms" for m in STEP_MODES if m + "_ms" in row)
                    + (f"  floor {row['floor_ms']:.3f} ms" if "floor_ms" in row else ""),
                    flush=True,
                )
    return rows


@torch.inference_mode()
def bench_mixed(
    model: Whisper, pools: _Pools, batches: list[int], position: int, timer: Timer, iters: int, copy_gbps: float | None
) -> list[dict]:
    """Graphed steps over rows of different window lengths (a third full 30 s windows, the rest
    2.5-12 s: finals among partials), by cross-attention kernel: SDPA with a masked frame bucket
    against the variable-length kernels that read each row's own frames."""
    dims = model.dims
    rng = np.random.default_rng(1)
    out = []
    for kernel in ("sdpa", "efficient", "flash"):
        try:
            runner = StepRunner(
                model,
                pools.cache,
                pools.cross_k,
                pools.cross_v,
                GraphOptions(mode="graph" if model.device.type == "cuda" else "eager", cross_attention=kernel),
            )
        except Exception as exc:
            out.append({"kernel": kernel, "error": repr(exc)[:300]})
            continue
        for b in batches:
            frames = [dims.n_audio_ctx if i % 3 == 0 else int(rng.integers(125, 600)) for i in range(b)]
            inputs = _chain_inputs(b, 1, position, dims.n_text_ctx, dims.n_vocab, rng)
            try:
                key = runner.prepare(*inputs, frames)
                fn = (
                    runner._step_fn(key)
                    if runner.mode != "eager"
                    else (lambda key=key, runner=runner: runner.body(key))
                )
                ms = timer(fn, iters=iters)
            except Exception as exc:
                out.append({"kernel": kernel, "batch": b, "error": repr(exc)[:300]})
                continue
            read = decoder_bytes(dims, b, 1, 0, key[3], model.dtype.itemsize)
            own = sum(frames) * dims.n_text_layer * 2 * dims.n_text_state * model.dtype.itemsize
            row = {
                "kernel": kernel,
                "batch": b,
                "mean_frames": float(np.mean(frames)),
                "bucket": list(key[:4]),
                "ms": ms,
                "floor_ms": (read["weights"] + read["self_kv"] + own) / copy_gbps / 1e6 if copy_gbps else None,
            }
            out.append(row)
            print(
                f"mixed    {kernel:9s} batch {b:3d} mean frames {row['mean_frames']:.0f}: {ms:7.3f} ms per step"
                + (f"  floor {row['floor_ms']:.3f}" if row["floor_ms"] else ""),
                flush=True,
            )
    return out


@torch.inference_mode()
def bench_exact(model: Whisper, sequences: int = 8, tokens: int = 48) -> dict:
    """Greedy decodes of the same segments (half full windows, half 6 s) by the plain eager batch,
    the bucketed step run eagerly and the graphed step: identical tokens?"""
    from engines.batching import Batch, Sequence
    from engines.whisper.decoding import DecodingOptions
    from engines.whisper.tokenizer import Tokenizer

    tok = Tokenizer(synthetic_vocabulary(model.dims.n_vocab))
    gen = torch.Generator(device=model.device).manual_seed(3)
    half = sequences // 2
    groups = [
        torch.randn(half, model.dims.n_audio_ctx, model.dims.n_audio_state, device=model.device, generator=gen),
        torch.randn(sequences - half, 300, model.dims.n_audio_state, device=model.device, generator=gen),
    ]
    groups = [g.to(model.dtype) for g in groups]
    options = DecodingOptions(max_new_tokens=tokens)
    results = {}
    modes = [("plain", None), ("bucketed_eager", GraphOptions(mode="eager"))]
    if model.device.type == "cuda":
        modes.append(("graph", GraphOptions(mode="graph")))
    for name, graphs in modes:
        batch = Batch(model, tok, [tok.eot], rows=sequences, graphs=graphs)
        seqs = []
        for feats in groups:
            group = [
                Sequence(tok.prompt("zh"), "zh", options, [], frames=feats.shape[1]) for _ in range(feats.shape[0])
            ]
            batch.admit(feats, group)
            seqs += group
            batch.step()
        while batch.active:
            batch.step()
        results[name] = [s.generated for s in seqs]
    out = {"sequences": sequences, "max_new_tokens": tokens, "lengths": [len(g) for g in results["plain"]]}
    for name in results:
        if name != "plain":
            out[f"{name}_equal_to_plain"] = sum(a == b for a, b in zip(results[name], results["plain"]))
    if "graph" in results:
        out["graph_equal_to_bucketed_eager"] = sum(a == b for a, b in zip(results["graph"], results["bucketed_eager"]))
    print("exact   ", out, flush=True)
    return out


class _RandomDrafter:
    """Always proposes `n` random tokens (cost only: a random model rejects them)."""

    source = "random"

    def __init__(self, n: int, seed: int):
        self.n, self.rng = n, np.random.default_rng(seed)

    def propose(self, generated, limit):
        from engines.whisper.decoding import Draft

        return Draft.chain(self.rng.integers(0, 50000, min(self.n, limit)).tolist(), self.source)


@torch.inference_mode()
def bench_step(
    model: Whisper,
    batches: list[int],
    frames: int,
    timer: Timer,
    draft: int = 0,
    steps: int = 12,
    cross_attention: str = "auto",
    mode: str = "graph",
) -> list[dict]:
    """The running batch's step() end to end (host work included), graphed (in `mode`) where CUDA is."""
    from engines.batching import Batch, Sequence
    from engines.whisper.decoding import DecodingOptions
    from engines.whisper.tokenizer import Tokenizer

    tok = Tokenizer(synthetic_vocabulary(model.dims.n_vocab))
    mode = mode if model.device.type == "cuda" else "eager"
    out = []
    rows = max(batches)
    graphs = replace(STEP_MODES[mode], cross_attention=cross_attention)
    batch = Batch(model, tok, [tok.eot], rows=rows, graphs=graphs)  # no <|endoftext|>
    for b in batches:
        feats = torch.randn(b, frames, model.dims.n_audio_state, device=model.device, dtype=model.dtype)
        options = DecodingOptions(max_new_tokens=200, max_draft=max(draft, 1))
        seqs = [
            Sequence(tok.prompt("zh"), "zh", options, [_RandomDrafter(draft, i)] if draft else [], frames=frames)
            for i in range(b)
        ]
        batch.admit(feats, seqs)
        batch.step()  # prompts
        for _ in range(3):  # capture this width's graphs
            batch.step()
        timer.sync()
        t0 = time.perf_counter()
        n = 0
        for _ in range(steps):
            batch.step()
            n += 1
        timer.sync()
        ms = (time.perf_counter() - t0) * 1000 / n
        active = len(batch.active)
        out.append(
            {"batch": b, "active_after": active, "draft": draft, "frames": frames, "mode": mode, "ms_per_step": ms}
        )
        print(
            f"step()   batch {b:3d} draft {draft:2d} frames {frames}: {ms:7.3f} ms per step (host work included)",
            flush=True,
        )
        for s in list(batch.active):
            batch.remove(s)
    return out


@torch.inference_mode()
def bench_probe(model: Whisper, pools: _Pools, batch: int, timer: Timer, copy_gbps: float | None) -> list[dict]:
    """One layer's cross-attention over 30 s at width 1: SDPA unmasked (flash) and masked."""
    import torch.nn.functional as F

    dims = model.dims
    h, dh = dims.n_text_head, dims.n_text_state // dims.n_text_head
    q = torch.randn(batch, h, 1, dh, device=model.device, dtype=model.dtype)
    k, v = pools.cross_k[0, :batch], pools.cross_v[0, :batch]
    mask = torch.ones(batch, 1, 1, k.shape[2], dtype=torch.bool, device=model.device)
    mask[:, :, :, -100:] = False
    nbytes = 2 * k.numel() * k.element_size()
    out = []
    if model.device.type == "cuda":
        from engines.gpu.cross_attention import cross_attention_report

        for b in sorted({1, 32, batch}):
            report = cross_attention_report(h, dh, k.shape[2], model.dtype, model.device, batch=b)
            for kernel, r in report.items():
                out.append({"kernel": f"mixed_lengths_{kernel}", "batch": b, **r})
                print(f"probe    mixed lengths {kernel:9s} batch {b}: {r}", flush=True)
    for name, fn in (
        ("sdpa_unmasked", lambda: F.scaled_dot_product_attention(q, k, v)),
        ("sdpa_bool_mask", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
        ("matmul_softmax", lambda: torch.softmax((q @ k.transpose(-1, -2)) * dh**-0.5, -1) @ v),
    ):
        ms = timer(fn, iters=50)
        out.append(
            {
                "kernel": name,
                "batch": batch,
                "frames": k.shape[2],
                "ms_per_layer": ms,
                "GBps": nbytes / ms / 1e6,
                "copy_GBps": copy_gbps,
            }
        )
        print(f"probe    {name:15s} batch {batch} 1 layer: {ms:.4f} ms, {nbytes / ms / 1e6:.0f} GB/s", flush=True)
    return out


@torch.inference_mode()
def bench_hf(
    dims: ModelDims,
    device: torch.device,
    dtype,
    batches: list[int],
    mel_frames: int,
    timer: Timer,
    iters: int,
    steps: int = 16,
) -> dict:
    """transformers' WhisperForConditionalGeneration, eager, same shape and dtype, random weights."""
    import transformers

    config = transformers.WhisperConfig(
        vocab_size=dims.n_vocab,
        num_mel_bins=dims.n_mels,
        d_model=dims.n_text_state,
        encoder_layers=dims.n_audio_layer,
        encoder_attention_heads=dims.n_audio_head,
        decoder_layers=dims.n_text_layer,
        decoder_attention_heads=dims.n_text_head,
        encoder_ffn_dim=4 * dims.n_audio_state,
        decoder_ffn_dim=4 * dims.n_text_state,
        max_source_positions=dims.n_audio_ctx,
        max_target_positions=dims.n_text_ctx,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.WhisperForConditionalGeneration(config)
    model = model.to(device, dtype).eval()
    result = {
        "transformers": transformers.__version__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "encoder": [],
        "decoder": [],
    }
    for b in batches:
        mel = torch.randn(b, dims.n_mels, 3000, device=device, dtype=dtype)  # transformers insists on the 30 s window
        ms = timer(
            lambda mel=mel, model=model: model.model.encoder(mel),
            iters=max(1, iters // 4) if b > 8 else iters,
            repeats=3,
        )
        result["encoder"].append({"batch": b, "mel_frames": 3000, "ms_per_call": ms, "ms_per_window": ms / b})
        print(f"hf encoder batch {b:3d}: {ms:8.2f} ms/call {ms / b:7.2f} ms/window", flush=True)
        del mel
    for b in batches:
        enc = torch.randn(b, dims.n_audio_ctx, dims.n_audio_state, device=device, dtype=dtype)
        prompt = torch.tensor([[50258, 50260, 50359, 50363]] * b, device=device)
        times = []
        for _ in range(2 if timer.repeats > 1 else 1):  # the last run is timed (the first warms up)
            out = model(encoder_outputs=(enc,), decoder_input_ids=prompt, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            timer.sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model(encoder_outputs=(enc,), decoder_input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            timer.sync()
            times.append((time.perf_counter() - t0) * 1000 / steps)
        ms = times[-1]
        result["decoder"].append(
            {"batch": b, "ms_per_step": ms, "tokens_per_s": b / ms * 1000, "frames": dims.n_audio_ctx}
        )
        print(f"hf decoder batch {b:3d}: {ms:8.2f} ms per step ({b / ms * 1000:.0f} tokens/s)", flush=True)
        del enc, out, cache
    del model
    return result


# -- the command ----------------------------------------------------------------------------------


def run_bench(args: argparse.Namespace) -> int:
    if not args.random_weights:
        print("error: bench-engine measures speed on random weights only; pass --random-weights", file=sys.stderr)
        return 2
    from engines.engine import resolve_device

    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    dims = SHAPES[args.shape]
    batches = _ints(args.batch)
    sections = set(args.sections.split(","))
    modes = (
        args.modes.split(",") if args.modes else (["eager", "graph", "kernels"] if device.type == "cuda" else ["eager"])
    )
    unknown = sorted(set(modes) - set(STEP_MODES))
    if unknown:
        raise SystemExit(f"unknown --modes {','.join(unknown)}: choose among {','.join(STEP_MODES)}")
    if device.type != "cuda":
        modes = [m for m in modes if m == "eager"] or ["eager"]
    timer = Timer(device, args.repeats)
    report: dict = {
        "command": ("python -m bench.engine" if sys.argv[0].endswith("bench.py") else Path(sys.argv[0]).name)
        + " "
        + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "shape": args.shape,
        "dims": dims.__dict__,
        "dtype": str(dtype).replace("torch.", ""),
        "random_weights": True,
        "modes": modes,
        "check": {},
    }

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))

    t_start = time.perf_counter()
    report["copy_GBps"] = copy_bandwidth(device, timer)
    model = random_model(dims, device, dtype, args.seed)
    report["build_s"] = round(time.perf_counter() - t_start, 2)
    save()
    if "encoder" in sections:
        report["encoder"] = bench_encoder(
            model, batches, args.encoder_frames, args.short_window, timer, args.iters, dtype, fused="compile" in modes
        )
        if args.sampled_clips:
            clips = [float(c) for c in args.sampled_clips.split(",")]
            report["sampled"] = bench_sampled(model, batches, clips, args.padding_stride, timer, args.iters, dtype)
        save()
    frames_list = [min(f, dims.n_audio_ctx) for f in _ints(args.frames)]
    pools = None
    if sections & {"decoder", "verify", "probe", "mixed"}:
        draft_batches = _ints(args.draft_batch) if "verify" in sections else []
        pools = _Pools(model, max(batches + draft_batches))
    if "decoder" in sections:
        report["decoder"] = bench_decoder(
            model,
            pools,
            batches,
            [1],
            frames_list,
            modes,
            _ints(args.compile_batch),
            args.position,
            timer,
            args.iters,
            "decoder",
            report["copy_GBps"],
            report["check"],
        )
        save()
    if "verify" in sections:
        widths = [d + 1 for d in _ints(args.drafts)]
        report["verification"] = bench_decoder(
            model,
            pools,
            _ints(args.draft_batch),
            widths,
            frames_list[:1],
            [m for m in modes if m != "compile"],
            [],
            args.position,
            timer,
            args.iters,
            "verify",
            report["copy_GBps"],
            report["check"],
        )
        save()
    if "mixed" in sections:
        report["mixed"] = bench_mixed(
            model,
            pools,
            [b for b in batches if b >= 8] or batches,
            args.position,
            timer,
            args.iters,
            report["copy_GBps"],
        )
        save()
    if "probe" in sections and device.type == "cuda":
        report["probe"] = bench_probe(model, pools, max(batches), timer, report["copy_GBps"])
        save()
    del pools
    if "step" in sections:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["step"] = []
        for mode in [m for m in modes if m != "eager"] or ["eager"]:
            for frames in frames_list:
                report["step"] += bench_step(model, batches, frames, timer, steps=args.step_steps, mode=mode)
            report["step"] += bench_step(
                model, batches, frames_list[0], timer, draft=8, steps=args.step_steps, mode=mode
            )
        save()
    if "exact" in sections:
        report["check"]["decode"] = bench_exact(model)
        save()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.baseline == "hf" and "hf" in sections:
        try:
            report["hf"] = bench_hf(dims, device, dtype, batches, args.encoder_frames, timer, args.iters, args.hf_steps)
        except Exception as exc:  # a transformers version whose API differs: keep the rest of the report
            report["hf"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print("hf baseline failed:", report["hf"]["error"], flush=True)
        save()
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print_summary(report)
    return 0


def print_summary(report: dict) -> None:
    print(f"\n{report['device']}  {report['shape']} {report['dtype']}  torch {report['torch']}  {report['date']}")
    hf_dec = {r["batch"]: r["ms_per_step"] for r in report.get("hf", {}).get("decoder", [])}
    hf_enc = {r["batch"]: r["ms_per_window"] for r in report.get("hf", {}).get("encoder", [])}
    for r in report.get("encoder", []):
        extra = f"  graphed {r['graph_ms_per_window']:.2f}" if "graph_ms_per_window" in r else ""
        extra += f"  fused {r['fused_ms_per_window']:.2f}" if "fused_ms_per_window" in r else ""
        extra += f"  (hf {hf_enc[r['batch']]:.2f})" if r["mel_frames"] == 3000 and r["batch"] in hf_enc else ""
        print(f"encoder  b={r['batch']:<3d} {r['seconds']:4.1f} s window: {r['ms_per_window']:7.2f} ms/window{extra}")
    for r in report.get("decoder", []):
        modes = " ".join(f"{m}={r[m + '_ms']:.3f}" for m in STEP_MODES if m + "_ms" in r)
        extra = f"  (hf {hf_dec[r['batch']]:.2f})" if r["frames"] == 1500 and r["batch"] in hf_dec else ""
        floor = f" floor={r['floor_ms']:.3f}" if "floor_ms" in r else ""
        print(f"decoder  b={r['batch']:<3d} F={r['frames']:<4d} ms/step {modes}{floor}{extra}")
    for r in report.get("verification", []):
        modes = " ".join(f"{m}={r[m + '_ms']:.3f}" for m in STEP_MODES if m + "_ms" in r)
        print(f"verify   b={r['batch']:<3d} draft={r['draft']:<2d} ms/forward {modes}")
    for r in report.get("mixed", []):
        if "ms" in r:
            print(
                f"mixed    {r['kernel']:9s} b={r['batch']:<3d} mean frames {r['mean_frames']:.0f}: {r['ms']:.3f} ms/step"
            )
    for r in report.get("step", []):
        print(
            f"step()   {r['mode']:7s} b={r['batch']:<3d} F={r['frames']:<4d} draft={r['draft']}: {r['ms_per_step']:.3f} ms"
        )
    if report.get("check"):
        print("check", report["check"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n")[0])
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
