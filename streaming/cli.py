"""`breeze-stream` command line: serve, transcribe, eval, replay, the load generator and the benchmarks."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="'default' (embedded whisper-base), a local path (HF dir, CTranslate2 dir, OpenAI .pt), a hub "
                             "id, or random:SHAPE (large-v2 = Breeze-ASR-25's shape, base, tiny): random weights for "
                             "capacity planning, decoding a realistic number of tokens per second of speech")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--medusa", metavar="HEADS", default=None,
                        help="Medusa heads file (breeze-stream train-medusa); default: the shipped heads where they fit the model")
    parser.add_argument("--fp32-weights", action="store_true",
                        help="CPU: keep float32 weights and PyTorch's own matrix products instead of fbgemm's "
                             "fp16-packed ones (the default where fbgemm exists: 2-10x faster, same transcripts)")
    parser.add_argument("--cuda-graphs", choices=["graph", "compile", "off"], default="graph",
                        help="CUDA: decoder steps and encoder calls replayed as CUDA graphs (default), the same with "
                             "Inductor-fused layer norms, biases, GELU and residual adds inside and the encoder's GELU in "
                             "cuBLASLt's epilogue, tanh form (compile: faster kernels, compiles for a minute at "
                             "start), or eager")
    from engines.trtllm.backend import add_backend_arguments
    add_backend_arguments(parser)  # --backend torch|trtllm-encoder|trtllm, --trtllm-engine-dir


def window_argument(value: str) -> float | None:
    """`--window`-style values: seconds of silence after the audio, or 'full' for Whisper's 30 s."""
    if value == "full":
        return None
    seconds = float(value)
    if not 0 <= seconds <= 30:
        raise argparse.ArgumentTypeError("a window margin is 0-30 seconds, or 'full'")
    return seconds


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--language", default="zh", help="zh | en | auto (detect) | any Whisper language code")
    parser.add_argument("--beam-size", type=int, default=1, help="1 = greedy (default)")
    parser.add_argument("--timestamps", action="store_true", help="decode with timestamp tokens")
    parser.add_argument("--window", type=window_argument, default=None, metavar="SECONDS|full",
                        help="encoder window: the audio plus this much silence (falls back to the full window on a "
                             "repetition loop), or 'full' for Whisper's 30 s window (default)")
    parser.add_argument("--speculative", choices=["off", "hypothesis", "medusa", "both"], default="both",
                        help="draft sources for exact speculative decoding (default both; medusa needs heads)")
    parser.add_argument("--script", choices=["traditional", "as-is"], default="traditional",
                        help="convert Chinese output to Taiwan Traditional with OpenCC s2twp (default) or keep it as the model writes it")
    parser.add_argument("--prompt", default="", metavar="TEXT",
                        help="names and terms to expect (Whisper's previous-text prompt, before every segment); an eval "
                             "manifest line's \"prompt\" overrides it for that clip")


def decoding_options(args: argparse.Namespace):
    from engines.decoding import DecodingOptions

    language = None if args.language == "auto" else args.language
    return DecodingOptions(language=language, beam_size=args.beam_size, timestamps=args.timestamps, prompt=args.prompt)


def load_engine(args: argparse.Namespace):
    from engines.trtllm.backend import load_backend  # --backend torch is engines.engine.Engine.load

    extra = engine_options(getattr(args, "fp32_weights", False), getattr(args, "cuda_graphs", "graph"))
    return load_backend(args, speculative=getattr(args, "speculative", "both"), medusa=args.medusa, **extra)


def engine_options(fp32_weights: bool = False, cuda_graphs: str = "graph", max_batch: int | None = None,
                   window_bucket: float | None = None) -> dict:
    """Engine keyword arguments of --fp32-weights, --cuda-graphs, --max-batch and --window-bucket
    (only where they differ from the defaults, so that backends without these options are not
    handed them)."""
    extra: dict = {"fp16_weights": False} if fp32_weights else {}
    if max_batch is not None:
        extra["max_batch"] = max_batch
    if window_bucket is not None:
        extra["window_bucket"] = window_bucket
    if cuda_graphs != "graph":
        from engines.cuda_graphs import GraphOptions

        extra["cuda_graphs"] = False if cuda_graphs == "off" else GraphOptions(mode=cuda_graphs)
    return extra


def cmd_transcribe(args: argparse.Namespace) -> int:
    from streaming.codecs import AudioFileError, load_audio
    from streaming.offline import transcribe_audio

    engine = load_engine(args)
    options = decoding_options(args)
    failures = 0
    out = []
    for path in args.files:
        try:
            audio = load_audio(path)
        except AudioFileError as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            failures += 1
            continue
        segments = transcribe_audio(engine, audio, options, window=args.window, words=args.word_timestamps)
        if args.json:
            out.append({"file": path, "segments": [segment_json(s) for s in segments]})
        else:
            print(f"# {path}")
            for s in segments:
                print(f"[{s.start:7.2f} -> {s.end:7.2f}] {s.text}")
                for w in s.words or []:
                    print(f"    [{w.start:7.2f} -> {w.end:7.2f}] {w.text.strip()}  ({w.probability:.2f})")
    if args.json:
        print(json.dumps(out, ensure_ascii=False, indent=2))
    engine.close()
    return 1 if failures else 0


def segment_json(segment) -> dict:
    """One segment of `transcribe --json`: times, text, and the word timings when asked for."""
    from streaming.session import word_list

    out = {"start": round(segment.start, 2), "end": round(segment.end, 2), "text": segment.text}
    if segment.words is not None:
        out["words"] = word_list(segment.words)
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    from streaming.evaluate import run_eval

    engine = load_engine(args)
    report = run_eval(engine, Path(args.manifest), decoding_options(args), limit=args.limit, window=args.window)
    engine.close()
    if args.json:
        Path(args.json).write_text(json.dumps(report, ensure_ascii=False, indent=2))
    return 0


def cmd_bench_offline(args: argparse.Namespace) -> int:
    from streaming.bench_offline import run_bench_offline

    return run_bench_offline(args)


def main(argv: list[str] | None = None) -> int:
    import engines  # noqa: F401  (sets the OpenMP wait policy before torch loads)

    parser = argparse.ArgumentParser(prog="breeze-stream", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the WebSocket server (native /v1/stream, metrics, demo page)")
    add_model_arguments(p)
    from streaming.server import add_serve_arguments, run_serve
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)

    p = sub.add_parser("transcribe", help="transcribe audio files (WAV/FLAC, other formats through ffmpeg)")
    add_model_arguments(p)
    add_decoding_arguments(p)
    p.add_argument("files", nargs="+")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--word-timestamps", action="store_true",
                   help="word timings for every segment (text, start, end, probability; one more decoder pass per segment)")
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("eval", help="offline accuracy and speed on a manifest (scoring of ../shared/eval/README.md)")
    add_model_arguments(p)
    add_decoding_arguments(p)
    p.add_argument("manifest")
    p.add_argument("--json", metavar="OUT", help="write the full report here")
    p.add_argument("--limit", type=int, default=None, help="only the first N clips")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("replay", help="replay clips to a server at real-time pace and measure latency")
    from streaming.replay import add_replay_arguments, run_replay
    add_replay_arguments(p)
    p.set_defaults(func=run_replay)

    p = sub.add_parser("bench-load", help="N concurrent real-time streams looping clips through a server: latency, "
                                         "losses, CER, server and client load")
    from bench.load import add_load_arguments, run_load
    add_load_arguments(p)
    p.set_defaults(func=run_load)

    p = sub.add_parser("build-trtllm", help="TensorRT-LLM 1.2.x engines for a Whisper checkpoint (--dry-run prints the commands)")
    from engines.trtllm.build import add_build_arguments, run_build
    add_build_arguments(p)
    p.set_defaults(func=run_build)

    p = sub.add_parser("bench-offline", help="our engine and faster-whisper on the same weights over a manifest")
    add_model_arguments(p)
    p.add_argument("manifest")
    p.add_argument("--window", type=window_argument, default=2.0, metavar="SECONDS",
                   help="the shortened encoder window of the fourth pass (default %(default)s)")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(func=cmd_bench_offline)

    p = sub.add_parser("train-medusa", help="train Medusa draft heads by self-distillation (labels: the model's own greedy output)")
    from engines.medusa_train import add_train_arguments, run_train
    add_train_arguments(p)
    p.set_defaults(func=run_train)

    p = sub.add_parser("bench-engine", help="encoder/decoder speed on random weights of a model shape (CUDA graphs, HF baseline)")
    from engines.bench import add_bench_arguments, run_bench
    add_bench_arguments(p)
    p.set_defaults(func=run_bench)

    p = sub.add_parser("bench-capacity", help="N simulated real-time streams through the engine scheduler (random weights)")
    from engines.capacity import add_capacity_arguments, run_capacity
    add_capacity_arguments(p)
    p.set_defaults(func=run_capacity)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
