"""Every option of the streaming commands (serve, transcribe, eval, replay, bench-offline), in one place.

Nothing heavy is imported here (no torch, numpy, websockets or the server), so that `breeze-stream
--help` and every command's `--help` answer at once; the modules that run the commands import only
when a command runs. An option means the same thing in every command that takes it: --language
takes zh, en or auto everywhere; --window is the encoder window's margin everywhere. Defaults of
`serve` mirror the config dataclasses (SegmenterConfig, TranscriberConfig, SessionConfig, Limits,
WhisperLiveConfig); tests/test_cli.py checks that they agree.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engines.options import DEVICE_HELP, LANGUAGES, SPECULATIVE, add_backend_arguments

# flag -> SegmenterConfig field and help; SEGMENTER_DEFAULTS are SegmenterConfig's defaults
SEGMENTER_FLAGS = {
    "--vad-aggressiveness": ("aggressiveness", "webrtcvad mode 0-3 (3 rejects the most non-speech)"),
    "--vad-frame-ms": ("frame_ms", "VAD frame: 10, 20 or 30 ms"),
    "--start-frames": ("start_voiced_frames", "voiced frames among the last --start-window-frames that open a segment"),
    "--start-window-frames": ("start_window_frames", "window of the start trigger, in VAD frames"),
    "--silence-ms": ("hangover_ms", "silence after speech that closes a segment (adds to final latency)"),
    "--pre-roll-ms": ("pre_roll_ms", "audio kept before the first voiced frame"),
    "--end-padding-ms": ("end_padding_ms", "audio kept after the last voiced frame"),
    "--min-speech-ms": ("min_speech_ms", "voiced audio a segment needs to be transcribed"),
    "--max-segment-ms": ("max_segment_ms", "longest segment; longer speech is cut at its quietest point"),
}

SEGMENTER_DEFAULTS = {
    "aggressiveness": 2,
    "frame_ms": 30,
    "start_voiced_frames": 3,
    "start_window_frames": 5,
    "hangover_ms": 480,
    "pre_roll_ms": 300,
    "end_padding_ms": 200,
    "min_speech_ms": 150,
    "max_segment_ms": 28000,
}


CLIPS_HELP = (
    'a manifest (.jsonl: one {"audio", "text", "lang"} object a line) or a folder of WAV files '
    "with a .txt transcript beside each (docs/evaluation.md)"
)


def window_argument(value: str) -> float | None:
    """`--window`-style values: seconds of silence after the audio, or 'full' for Whisper's 30 s."""
    if value == "full":
        return None
    seconds = float(value)
    if not 0 <= seconds <= 30:
        raise argparse.ArgumentTypeError("a window margin is 0-30 seconds, or 'full'")
    return seconds


def stride_argument(value: str) -> int:
    """`--padding-stride`: a whole number of positions, at least 1."""
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError("a padding stride is a whole number of positions, 1 or more")
    return int(value)


def add_language_argument(parser: argparse.ArgumentParser, default: str | None = "zh", help: str | None = None) -> None:
    """--language: zh, en or auto (detect), as the native protocol's start message takes it."""
    parser.add_argument(
        "--language",
        choices=LANGUAGES,
        default=default,
        help=help or "language of the speech: zh, en, or auto to detect it (default %(default)s)",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (embedded whisper-base), a local path (HF dir, CTranslate2 dir, OpenAI .pt), a hub "
        "id, or random:SHAPE (large-v2 = Breeze-ASR-25's shape, base, tiny): random weights for "
        "capacity planning, decoding a realistic number of tokens per second of speech",
    )
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument(
        "--medusa",
        metavar="HEADS",
        default=None,
        help="Medusa heads file (breeze-stream train-medusa); default: the shipped heads where they fit the model",
    )
    parser.add_argument(
        "--fp32-weights",
        action="store_true",
        help="CPU: keep float32 weights and PyTorch's own matrix products instead of fbgemm's "
        "fp16-packed ones (the default where fbgemm exists: 2-10x faster, same transcripts)",
    )
    parser.add_argument(
        "--padding-stride",
        type=stride_argument,
        default=None,
        metavar="N",
        help="full 30 s encoder windows: the silence padding after the audio sampled every N positions, "
        "each sample weighted as N (1: computed in full, Whisper's own window; default 4 on the CPU, 1 on a GPU)",
    )
    parser.add_argument(
        "--cuda-graphs",
        choices=["graph", "compile", "off"],
        default="graph",
        help="CUDA: decoder steps and encoder calls replayed as CUDA graphs (default), the same with "
        "Inductor-fused layer norms, biases, GELU and residual adds inside and the encoder's GELU in "
        "cuBLASLt's epilogue, tanh form (compile: faster kernels, compiles for a minute at "
        "start), or eager",
    )
    add_backend_arguments(parser)  # --backend torch|trtllm-encoder|trtllm, --trtllm-engine-dir


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    add_language_argument(parser)
    parser.add_argument("--beam-size", type=int, default=1, help="1 = greedy (default)")
    parser.add_argument("--timestamps", action="store_true", help="decode with timestamp tokens")
    parser.add_argument(
        "--window",
        type=window_argument,
        default=None,
        metavar="SECONDS|full",
        help="encoder window: the audio plus this much silence (falls back to the full window on a "
        "repetition loop), or 'full' for Whisper's 30 s window (default)",
    )
    parser.add_argument(
        "--speculative",
        choices=SPECULATIVE,
        default=None,
        help="draft sources for exact speculative decoding (medusa needs heads; default: off on the CPU, "
        "where offline segments have no previous hypothesis and other drafts cost more than they save; both on a GPU)",
    )
    parser.add_argument(
        "--script",
        choices=["traditional", "as-is"],
        default="traditional",
        help="convert Chinese output to Taiwan Traditional with OpenCC s2twp (default) or keep it as the model writes it",
    )
    parser.add_argument(
        "--prompt",
        default="",
        metavar="TEXT",
        help="names and terms to expect (Whisper's previous-text prompt, before every segment); an eval "
        'manifest line\'s "prompt" overrides it for that clip',
    )


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `serve` besides --model and --device (breeze_stream.cli adds those)."""
    _add_stream_arguments(parser)
    _add_process_arguments(parser)
    guard = parser.add_argument_group("auth, limits and shutdown (every WebSocket endpoint)")
    _add_auth_arguments(guard)
    _add_admission_arguments(guard)
    _add_limit_arguments(guard)
    _add_protocol_arguments(parser)


def _add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """Where to listen, and how sessions are transcribed."""
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on, 0.0.0.0 for all (default %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8765, help="port of WebSocket and HTTP, 0 for any free one (default %(default)s)"
    )
    add_language_argument(parser, help="language of sessions whose start message names none (default %(default)s)")
    parser.add_argument(
        "--script",
        choices=["traditional", "as-is"],
        default="traditional",
        help="convert Chinese output to Taiwan Traditional with OpenCC s2twp, or keep the model's script "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--partial-interval",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="new audio between partial hypotheses, 0 for none (default %(default)s)",
    )
    parser.add_argument(
        "--partial-window",
        type=window_argument,
        default=2.0,
        metavar="SECONDS|full",
        help="encoder window of partials: the segment plus this much silence, or 'full' for 30 s (default %(default)s)",
    )
    parser.add_argument(
        "--final-window",
        type=window_argument,
        default=None,
        metavar="SECONDS|full",
        help="encoder window of finals, as --partial-window (default full)",
    )
    parser.add_argument(
        "--no-early-finals",
        dest="early_finals",
        action="store_false",
        help="start a segment's final only once its silence hangover has passed, not as soon as the "
        "silence holds the end padding (early finals: the same text, about 0.28 s sooner; void work "
        "where speech resumes)",
    )
    parser.add_argument(
        "--speculative",
        choices=SPECULATIVE,
        default=None,
        help="draft sources for exact speculative decoding; medusa needs heads (default: hypothesis+lookup on "
        "the CPU, where Medusa's heads cost more than they save; both, i.e. all three, on a GPU)",
    )
    parser.add_argument(
        "--prompt",
        default="",
        metavar="TEXT",
        help="names and terms to expect, for sessions that send no prompt of their own (Whisper's "
        'previous-text prompt; native start "prompt", Realtime transcription.prompt, WhisperLive '
        'initial_prompt, Twilio <Parameter name="prompt">)',
    )
    parser.add_argument(
        "--condition-on-previous",
        action="store_true",
        help="add each stream's earlier finals to the prompt of its next segments (Whisper's "
        "condition_on_previous_text; a native start message may set condition_on_previous)",
    )


def _add_process_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's batch, the worker processes, and the size and idle limits of a session."""
    parser.add_argument(
        "--max-batch",
        type=int,
        default=None,
        metavar="ROWS",
        help="rows of the engine's running batch: segments decoded at once (default 16 on a GPU, 4 on the CPU)",
    )
    parser.add_argument(
        "--window-bucket",
        type=float,
        default=None,
        metavar="SECONDS",
        help="shortened encoder windows round up to multiples of this, so that segments of similar "
        "length share an encoder call (default 1)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="front-end processes (sockets, VAD, events) in front of one engine process, sharing "
        "--port: for hundreds of streams on a GPU (default 0: one process, best on a CPU)",
    )
    parser.add_argument(
        "--max-frame-bytes",
        type=int,
        default=1 << 20,
        metavar="BYTES",
        help="largest WebSocket frame a client may send (default %(default)s)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="a session without frames this long flushes its finals and ends, 0 for never (default %(default)s)",
    )


def _add_auth_arguments(group: argparse._ArgumentGroup) -> None:
    """Keys, origins and TLS."""
    group.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="require one of the keys in FILE (one a line; re-read when it changes): Authorization: Bearer, "
        "?token=, or a token in the first message (default: no auth)",
    )
    group.add_argument(
        "--allowed-origins",
        default=None,
        metavar="LIST",
        help="comma-separated browser origins allowed to connect, e.g. https://app.example.com; list this "
        "server's own for its demo page (default: any)",
    )
    group.add_argument(
        "--certfile", default=None, metavar="PEM", help="TLS certificate chain: serve wss:// and https://"
    )
    group.add_argument("--keyfile", default=None, metavar="PEM", help="TLS private key (if not in --certfile)")
    group.add_argument(
        "--max-sessions",
        type=int,
        default=256,
        metavar="N",
        help="WebSocket connections at once; more get HTTP 503 (default %(default)s, 0: no limit)",
    )
    group.add_argument(
        "--max-connections-per-client",
        type=int,
        default=32,
        metavar="N",
        help="connections at once from one client address; more get HTTP 429 (default %(default)s, 0: no limit)",
    )


def _add_admission_arguments(group: argparse._ArgumentGroup) -> None:
    """How many sessions are taken: the session limits and the measured capacity (streaming.server.admission)."""
    group.add_argument(
        "--admission",
        choices=("measured", "off"),
        default="measured",
        help="measured: refuse new sessions (HTTP 503 + Retry-After, /readyz 503) while the server is at "
        "the capacity it measures (engine time per second of final audio, speech per session, audio "
        "waiting for finals); off: only --max-sessions limits them (default %(default)s)",
    )
    group.add_argument(
        "--admission-floor",
        type=int,
        default=None,
        metavar="N",
        help="sessions admitted before anything is measured (default 8 on a CPU, 32 on a GPU)",
    )
    group.add_argument(
        "--admission-utilization",
        type=float,
        default=None,
        metavar="SHARE",
        help="share of the engine's time the finals of admitted sessions may take (default 0.5 on a "
        "CPU, where finals queue one by one behind partials, 0.6 on a GPU)",
    )
    group.add_argument(
        "--admission-max-wait",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="no new session while finals wait this long for the engine (default %(default)s)",
    )


def _add_limit_arguments(group: argparse._ArgumentGroup) -> None:
    """What a session may take, shutdown and keepalive."""
    group.add_argument(
        "--trusted-proxies",
        default="",
        metavar="LIST",
        help="comma-separated networks of load balancers (e.g. 10.0.0.0/8): connections from them count "
        "against the client named in X-Forwarded-For (default: none; the peer address counts)",
    )
    group.add_argument(
        "--max-session-seconds",
        type=float,
        default=14400.0,
        metavar="SECONDS",
        help="longest session; then its finals are flushed and it ends (default %(default)s, 0: no limit)",
    )
    group.add_argument(
        "--max-queued-audio",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a session's audio waiting for finals before the server stops reading its frames "
        "(default %(default)s, 0: no limit)",
    )
    group.add_argument(
        "--max-send-queue",
        type=int,
        default=1024,
        metavar="EVENTS",
        help="events waiting for a client that does not read them before it is disconnected (default %(default)s)",
    )
    group.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, time sessions get to flush their finals; the server exits within it "
        "(default %(default)s)",
    )
    group.add_argument(
        "--ping-interval",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="keepalive pings to every WebSocket client (default %(default)s, 0: none)",
    )
    group.add_argument(
        "--ping-timeout",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="a client whose pong is this late is closed with 1011; time the server spends not reading a "
        "client it pushes back on (see --max-queued-audio) does not count (default %(default)s)",
    )


def _add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """The compatible protocols and the segmenter."""
    compat = parser.add_argument_group("compatible protocols (OpenAI Realtime at /v1/realtime is always on)")
    compat.add_argument(
        "--whisperlive-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also listen for WhisperLive clients on this port, any path (default: off)",
    )
    compat.add_argument(
        "--whisperlive-max-clients",
        type=int,
        default=4,
        metavar="N",
        help="WhisperLive sessions at once; more get WAIT (default %(default)s)",
    )
    compat.add_argument(
        "--whisperlive-max-connection-time",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="WhisperLive session limit, then DISCONNECT (default %(default)s)",
    )
    compat.add_argument(
        "--call-webhook",
        default=None,
        metavar="URL",
        help="POST each final of Twilio calls (/v1/twilio) to this URL as JSON (default: off)",
    )
    compat.add_argument(
        "--call-log",
        type=Path,
        default=None,
        metavar="DIR",
        help="append the finals of each Twilio call to DIR/{callSid}.jsonl (default: off)",
    )
    vad = parser.add_argument_group("segmenter (webrtcvad)")
    for flag, (name, text) in SEGMENTER_FLAGS.items():
        vad.add_argument(
            flag,
            dest=f"segmenter_{name}",
            type=int,
            default=SEGMENTER_DEFAULTS[name],
            metavar="N",
            help=f"{text} (default %(default)s)",
        )
