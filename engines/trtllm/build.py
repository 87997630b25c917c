"""`breeze-stream build-trtllm`: TensorRT-LLM 1.2.x engines for a Whisper checkpoint.

    breeze-stream build-trtllm --model MediaTek-Research/Breeze-ASR-25|PATH --out DIR
        [--dtype float16] [--int8-weight-only] [--max-batch 64] [--dry-run]

Steps (the recipe of TensorRT-LLM's `examples/models/core/whisper/README.md` at 1.2.x, corrected
for Mandarin as ../shared/reference/tensorrt-llm.md §1.2-1.3 explains):

1. An OpenAI-format `.pt` at `DIR/assets/large-v2.pt`. For Breeze-ASR-25 it is the file MediaTek
   publishes in the hub repository (fetched, sha256 checked against its folder name); an OpenAI
   `.pt` given as PATH is linked; anything else is converted with our own converter
   (`engines.trtllm.convert`). The file name is only the converter's slot (`--model_name` picks
   the file; the dimensions come from inside it).
2. TensorRT-LLM's `convert_checkpoint.py` (`--model_dir --model_name --dtype --output_dir`, plus
   `--use_weight_only --weight_only_precision int8|int4`) -> `DIR/checkpoint/{encoder,decoder}`.
3. `trtllm-build` for the encoder: `--gemm_plugin disable --bert_attention_plugin DTYPE
   --max_input_len 3000 --max_seq_len 3000 --moe_plugin disable --max_batch_size N`.
4. `trtllm-build` for the decoder: `--gemm_plugin/--bert_attention_plugin/--gpt_attention_plugin
   DTYPE --max_seq_len 448 --max_input_len 14 --max_encoder_input_len 3000 --max_beam_width W
   --max_batch_size N --moe_plugin disable`. 448 is Whisper's whole decoder context: the README's
   114 leaves about 100 new tokens, too few for 30 s of Mandarin. Paged KV cache and input-padding
   removal stay at their defaults (enabled), which the Executor's in-flight batching needs.
   `--encoder-only` skips this (the `trtllm-encoder` backend decodes in PyTorch).
5. `DIR/vocabulary.json` and `DIR/manifest.json` (versions, flags, commands, GPU architecture);
   the manifest is written last, so its presence means the build finished.

`--dry-run` prints the commands and runs nothing; it needs neither TensorRT-LLM nor a GPU nor the
network. Steps this program does itself (fetch, link, convert, manifest) are printed as the
equivalent shell command and marked `in-process`.

This module is the plan (options, commands, steps); engines/trtllm/builder.py runs it and holds
the command line.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import MANIFEST, TRTLLM_IMAGE, TRTLLM_VERSION, VOCABULARY, WHISPER_EXAMPLES

if TYPE_CHECKING:
    from .builder import Builder

BREEZE_REPO = "MediaTek-Research/Breeze-ASR-25"
BREEZE_REVISION = "cffe7ccb404d025296a00758d0a33468bec3a9d0"
"""Hub revision whose OpenAI `.pt` is pinned below (found in independent downstream projects that
pin the same revision, path, size and sha256; not fetched from this machine)."""
BREEZE_SHA256 = "9c94a3554ff4f0de83494e2ed7ba5826efa74bd87955c034b4d0fd681746b690"
BREEZE_FILE = f"whisper-github/{BREEZE_SHA256}/breeze-asr-25.pt"
BREEZE_SIZE = 3_087_008_569
SLOT = "large-v2"
"""`--model_name` of TensorRT-LLM's converter: it only names the file `<model_dir>/<name>.pt`."""

DTYPES = ("float16", "bfloat16")
WEIGHT_ONLY = ("int8", "int4")
ENCODER_INPUT_LEN = 3000  # mel frames of Whisper's 30 s window; the encoder halves it to 1500
PROMPT_TOKENS = 5  # <|startoftranscript|> <|zh|> [<|en|>] <|transcribe|> <|notimestamps|>
N_TEXT_CTX = 448  # Whisper's decoder positions (large-v2, Breeze-ASR-25)


class BuildError(RuntimeError):
    """What stops a build, phrased so that the user knows what to install or change."""


@dataclass(frozen=True)
class BuildOptions:
    model: str
    out: Path
    dtype: str = "float16"
    weight_only: str | None = None  # int8 | int4 (W8A16 / W4A16)
    max_batch: int = 64
    max_beam_width: int = 1
    max_seq_len: int = N_TEXT_CTX
    max_input_len: int = 14
    encoder_only: bool = False
    revision: str = BREEZE_REVISION
    examples: Path = Path(os.environ.get("TRTLLM_WHISPER_EXAMPLES", WHISPER_EXAMPLES))
    keep_checkpoint: bool = False
    force: bool = False

    def problems(self) -> list[str]:
        """Everything wrong with the options (all of it at once, not the first thing)."""
        out = []
        if self.dtype not in DTYPES:
            out.append(
                f"--dtype must be one of {', '.join(DTYPES)} (TensorRT-LLM's Whisper support matrix is FP16 "
                f"and INT8/INT4 weight-only; there is no FP8), got {self.dtype!r}"
            )
        if self.weight_only not in (None, *WEIGHT_ONLY):
            out.append(f"weight-only precision must be one of {', '.join(WEIGHT_ONLY)}, got {self.weight_only!r}")
        if self.max_batch < 1:
            out.append(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.max_beam_width < 1:
            out.append(f"--max-beam-width must be at least 1, got {self.max_beam_width}")
        if self.max_input_len < PROMPT_TOKENS:
            out.append(
                f"--max-input-len must hold the decoder prompt ({PROMPT_TOKENS} tokens with a code-switching "
                f"prefix), got {self.max_input_len}"
            )
        if self.max_seq_len > N_TEXT_CTX:
            out.append(f"--max-seq-len cannot exceed Whisper's {N_TEXT_CTX} decoder positions, got {self.max_seq_len}")
        if self.max_seq_len <= self.max_input_len:
            out.append(
                f"--max-seq-len ({self.max_seq_len}) must exceed --max-input-len ({self.max_input_len}): "
                "it counts the prompt and the new tokens"
            )
        if self.out.exists() and not self.out.is_dir():
            out.append(f"--out {self.out} exists and is not a directory")
        return out

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid build-trtllm options:\n  - " + "\n  - ".join(problems))

    # -- the layout of DIR ------------------------------------------------------------------

    @property
    def assets(self) -> Path:
        return self.out / "assets"

    @property
    def pt(self) -> Path:
        return self.assets / f"{SLOT}.pt"

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    @property
    def download_dir(self) -> Path:
        return self.out / "download"


@dataclass(frozen=True)
class Source:
    """Where the OpenAI `.pt` comes from: `breeze` (MediaTek's own file on the hub), `openai-pt`
    (a local OpenAI `.pt`, linked) or `convert` (anything else, through our converter)."""

    kind: str
    spec: str


def resolve_source(model: str) -> Source:
    if model.strip("/").lower() == BREEZE_REPO.lower():
        return Source("breeze", BREEZE_REPO)
    path = Path(model).expanduser()
    if path.suffix in (".pt", ".pth") and (path.is_file() or not path.exists()):
        return Source("openai-pt", str(path))
    return Source("convert", model)


@dataclass(frozen=True)
class Step:
    title: str
    argv: tuple[str, ...]
    in_process: bool = False  # done by this program; argv is the equivalent shell command
    run: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    def render(self) -> str:
        return render_command(self.argv)


def render_command(argv: tuple[str, ...] | list[str]) -> str:
    """One command, shell-quoted, a flag and its value per continued line."""
    words = [shlex.quote(str(a)) for a in argv]
    head: list[str] = []
    while words and not words[0].startswith("--"):
        head.append(words.pop(0))
    lines = [" ".join(head)]
    while words:
        group = [words.pop(0)]
        while words and not words[0].startswith("--"):
            group.append(words.pop(0))
        lines.append("    " + " ".join(group))
    return " \\\n".join(lines)


# ---- the commands ------------------------------------------------------------------------------


def precision(options: BuildOptions) -> list[str]:
    if options.weight_only is None:
        return []
    return ["--use_weight_only", "--weight_only_precision", options.weight_only]


def convert_checkpoint_command(options: BuildOptions, python: str = sys.executable) -> list[str]:
    return [
        python,
        str(options.examples / "convert_checkpoint.py"),
        "--model_dir",
        str(options.assets),
        "--model_name",
        SLOT,
        "--dtype",
        options.dtype,
        *precision(options),
        "--output_dir",
        str(options.checkpoint_dir),
    ]


def encoder_build_command(options: BuildOptions, trtllm_build: str = "trtllm-build") -> list[str]:
    return [
        trtllm_build,
        "--checkpoint_dir",
        str(options.checkpoint_dir / "encoder"),
        "--output_dir",
        str(options.out / "encoder"),
        "--moe_plugin",
        "disable",
        "--max_batch_size",
        str(options.max_batch),
        "--gemm_plugin",
        "disable",
        "--bert_attention_plugin",
        options.dtype,
        "--max_input_len",
        str(ENCODER_INPUT_LEN),
        "--max_seq_len",
        str(ENCODER_INPUT_LEN),
    ]


def decoder_build_command(options: BuildOptions, trtllm_build: str = "trtllm-build") -> list[str]:
    return [
        trtllm_build,
        "--checkpoint_dir",
        str(options.checkpoint_dir / "decoder"),
        "--output_dir",
        str(options.out / "decoder"),
        "--moe_plugin",
        "disable",
        "--max_beam_width",
        str(options.max_beam_width),
        "--max_batch_size",
        str(options.max_batch),
        "--max_seq_len",
        str(options.max_seq_len),
        "--max_input_len",
        str(options.max_input_len),
        "--max_encoder_input_len",
        str(ENCODER_INPUT_LEN),
        "--gemm_plugin",
        options.dtype,
        "--bert_attention_plugin",
        options.dtype,
        "--gpt_attention_plugin",
        options.dtype,
    ]


def plan(options: BuildOptions, build: Builder | None = None) -> list[Step]:
    """The steps of a build, in order; `build` (None for a dry run) supplies the in-process actions."""
    act = (lambda name: getattr(build, name)) if build is not None else (lambda name: None)
    python = build.python if build is not None else sys.executable
    trtllm_build = build.trtllm_build if build is not None else "trtllm-build"
    steps = _source_steps(options, resolve_source(options.model), act, python)
    steps.append(
        Step(
            "TensorRT-LLM checkpoint conversion (OpenAI .pt -> encoder/ and decoder/)",
            tuple(convert_checkpoint_command(options, python)),
        )
    )
    steps.append(Step("encoder engine", tuple(encoder_build_command(options, trtllm_build))))
    if not options.encoder_only:
        steps.append(Step("decoder engine", tuple(decoder_build_command(options, trtllm_build))))
    steps.append(
        Step(
            f"write {options.out / VOCABULARY} and {options.out / MANIFEST} (versions, flags, commands, "
            "GPU); the manifest last",
            (),
            True,
            act("write_manifest"),
        )
    )
    if not options.keep_checkpoint:
        steps.append(
            Step(
                "remove the intermediate TensorRT-LLM checkpoint (--keep-checkpoint keeps it)",
                ("rm", "-rf", str(options.checkpoint_dir)),
                True,
                act("remove_checkpoint"),
            )
        )
    return steps


def _source_steps(
    options: BuildOptions, source: Source, act: Callable[[str], Callable[[], None] | None], python: str
) -> list[Step]:
    """The steps that put the model, as an OpenAI-format .pt, in the converter's slot."""
    steps: list[Step] = []
    if source.kind == "breeze":
        file = BREEZE_FILE if options.revision == BREEZE_REVISION else "whisper-github/<sha256>/breeze-asr-25.pt"
        steps.append(
            Step(
                f"fetch the OpenAI-format .pt MediaTek publishes ({BREEZE_REPO}@{options.revision[:12]}; "
                "sha256 checked against its folder name)",
                (
                    "hf",
                    "download",
                    BREEZE_REPO,
                    file,
                    "--revision",
                    options.revision,
                    "--local-dir",
                    str(options.download_dir),
                ),
                True,
                act("fetch_breeze"),
            )
        )
        steps.append(
            Step(
                "put it in the converter's slot",
                ("ln", "-sfn", str(Path("..") / "download" / file), str(options.pt)),
                True,
                act("link_breeze"),
            )
        )
    elif source.kind == "openai-pt":
        target = Path(source.spec).expanduser().resolve()
        steps.append(
            Step(
                "put the OpenAI .pt in the converter's slot (its format is checked first)",
                ("ln", "-sfn", str(target), str(options.pt)),
                True,
                act("link_pt"),
            )
        )
    else:
        steps.append(
            Step(
                "convert to an OpenAI-format .pt (breeze-stream's own converter)",
                (python, "-m", "engines.trtllm.convert", source.spec, str(options.pt), "--dtype", "float16"),
                True,
                act("convert"),
            )
        )
    return steps


def render_plan(options: BuildOptions, steps: list[Step]) -> str:
    lines = [
        f"# breeze-stream build-trtllm --dry-run: TensorRT-LLM {TRTLLM_VERSION} (pinned; image {TRTLLM_IMAGE})",
        f"# model {options.model} -> {options.out}; nothing below was run",
    ]
    if options.max_seq_len < N_TEXT_CTX:
        lines.append(
            f"# note: decoder --max_seq_len {options.max_seq_len} < {N_TEXT_CTX} leaves {options.max_seq_len - 4} "
            "new tokens after the usual 4-token prompt; 30 s of Mandarin can need more"
        )
    for i, step in enumerate(steps, 1):
        lines.append(f"# {i}. {step.title}" + (" [in-process]" if step.in_process else ""))
        if step.argv:
            lines.append(step.render())
    return "\n".join(lines)
