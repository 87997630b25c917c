"""`breeze-stream build-trtllm` run for real: the environment checked before anything starts, the
steps of the plan (engines/trtllm/build.py) carried out, and the manifest written last."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from . import MANIFEST, MANIFEST_FORMAT, TRTLLM_IMAGE, TRTLLM_SERIES, TRTLLM_VERSION, VOCABULARY, WHISPER_EXAMPLES

if TYPE_CHECKING:
    from engines.weights.checkpoints import Checkpoint

from .build import (
    BREEZE_FILE,
    BREEZE_REPO,
    BREEZE_REVISION,
    DTYPES,
    ENCODER_INPUT_LEN,
    N_TEXT_CTX,
    BuildError,
    BuildOptions,
    Step,
    plan,
    render_plan,
    resolve_source,
)

# ---- the environment ---------------------------------------------------------------------------


def trtllm_version() -> str | None:
    """The installed TensorRT-LLM's version without importing it (importing needs a GPU and MPI)."""
    for dist in ("tensorrt-llm", "tensorrt_llm"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


NVIDIA_SMI_QUERY = ("nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total", "--format=csv,noheader")


def parse_nvidia_smi(text: str) -> list[dict[str, str]]:
    """`name, compute_cap, driver_version, memory.total` lines -> one dict per GPU."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[0]:
            continue
        name, cap, driver, memory = parts[0], parts[1], parts[2], ",".join(parts[3:])
        gpu = {"name": name, "compute_cap": cap, "driver_version": driver, "memory_total": memory}
        if cap.replace(".", "").isdigit():
            gpu["sm"] = "sm_" + cap.replace(".", "")
        gpus.append(gpu)
    return gpus


def gpu_info() -> list[dict[str, str]] | None:
    """The GPUs nvidia-smi sees; None when there is no nvidia-smi or it fails (no driver)."""
    if shutil.which(NVIDIA_SMI_QUERY[0]) is None:
        return None
    try:
        done = subprocess.run(NVIDIA_SMI_QUERY, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi(done.stdout)


def preflight(
    options: BuildOptions,
    *,
    version: str | None = None,
    which=shutil.which,
    gpus: list[dict[str, str]] | None | bool = False,
) -> list[str]:
    """What a real build lacks here (all of it at once). `version`, `which` and `gpus` are for tests."""
    problems = []
    version = trtllm_version() if version is None else version
    if not version:
        problems.append(
            f"TensorRT-LLM is not installed: build inside {TRTLLM_IMAGE} (docker/Dockerfile.gpu) or "
            f"`pip install tensorrt-llm=={TRTLLM_VERSION}` on a Linux machine with an NVIDIA GPU"
        )
    elif not version.startswith(TRTLLM_SERIES):
        problems.append(
            f"TensorRT-LLM {version} is installed, but build-trtllm is pinned to {TRTLLM_SERIES}x "
            f"(the last releases with convert_checkpoint.py and trtllm-build; 1.3+ removed them): use "
            f'{TRTLLM_IMAGE}, or see docs/trtllm.md (from the README), "The 1.3+ route", for the LLM-API route'
        )
    if which("trtllm-build") is None:
        problems.append("trtllm-build is not on PATH (it comes with the tensorrt-llm package)")
    if not (options.examples / "convert_checkpoint.py").is_file():
        problems.append(
            f"{options.examples / 'convert_checkpoint.py'} not found: pass --trtllm-examples (or set "
            f"TRTLLM_WHISPER_EXAMPLES) to examples/models/core/whisper of TensorRT-LLM v{TRTLLM_VERSION} "
            f"(in {TRTLLM_IMAGE} it is {WHISPER_EXAMPLES})"
        )
    gpus = gpu_info() if gpus is False else gpus
    if not gpus:
        problems.append(
            "no NVIDIA GPU visible (nvidia-smi is missing or lists none): trtllm-build compiles for the GPU "
            "it runs on; with Docker, run with --gpus all"
        )
    source = resolve_source(options.model)
    if source.kind == "openai-pt" and not Path(source.spec).expanduser().is_file():
        problems.append(f"--model {source.spec}: no such file")
    if source.kind == "breeze" and package_version("huggingface_hub") is None:
        problems.append("huggingface_hub is not installed (needed to fetch Breeze-ASR-25)")
    if (options.out / MANIFEST).exists() and not options.force:
        problems.append(f"{options.out} already holds a finished build ({MANIFEST}); pass --force to rebuild")
    return problems


# ---- running it --------------------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def link(target: Path, link_path: Path) -> None:
    link_path.parent.mkdir(parents=True, exist_ok=True)
    if link_path.is_symlink() or link_path.exists():
        link_path.unlink()
    link_path.symlink_to(target)


class Builder:
    """Carries out a plan; in-process steps are its methods, named in `plan`."""

    def __init__(self, options: BuildOptions, progress: Callable[[str], None] = print):
        self.options = options
        self.say = progress
        self.python = sys.executable
        self.trtllm_build = shutil.which("trtllm-build") or "trtllm-build"
        self.source = resolve_source(options.model)
        self.checkpoint: Checkpoint | None = None  # of the .pt (vocabulary, dims), once fetched or converted
        self.fetched: dict[str, object] = {}
        self.commands: list[list[str]] = []
        self.steps = plan(options, self)

    def run(self) -> dict:
        for i, step in enumerate(self.steps, 1):
            self.say(f"[{i}/{len(self.steps)}] {step.title}")
            if step.in_process:
                assert step.run is not None, "an in-process step carries its function"
                step.run()
            else:
                self.commands.append(list(step.argv))
                self.run_command(step)
        return self.manifest

    # -- in-process steps ----------------------------------------------------------------------

    def fetch_breeze(self) -> None:
        from huggingface_hub import HfApi, hf_hub_download

        o = self.options
        file = BREEZE_FILE
        if o.revision != BREEZE_REVISION:
            files = [
                f
                for f in HfApi().list_repo_files(BREEZE_REPO, revision=o.revision)
                if f.startswith("whisper-github/") and f.endswith("/breeze-asr-25.pt")
            ]
            if len(files) != 1:
                raise BuildError(
                    f"{BREEZE_REPO}@{o.revision}: expected one whisper-github/<sha256>/breeze-asr-25.pt, "
                    f"found {files or 'none'}"
                )
            file = files[0]
        path = Path(hf_hub_download(BREEZE_REPO, file, revision=o.revision, local_dir=o.download_dir))
        expected = file.split("/")[-2]
        self.say(f"checking sha256 of {path} ({path.stat().st_size / 1e9:.2f} GB)")
        got = sha256_file(path)
        if got != expected:
            raise BuildError(
                f"{path}: sha256 {got} does not match {expected} (the folder name MediaTek gives it); "
                "delete it and run again"
            )
        self.fetched = {
            "repo": BREEZE_REPO,
            "revision": o.revision,
            "file": file,
            "sha256": got,
            "bytes": path.stat().st_size,
        }
        self._breeze_file = file

    def link_breeze(self) -> None:
        file = getattr(self, "_breeze_file", BREEZE_FILE)
        link(Path("..") / "download" / file, self.options.pt)
        self._load_pt()

    def link_pt(self) -> None:
        from .convert import read_openai_dims

        target = Path(self.source.spec).expanduser().resolve()
        read_openai_dims(target)  # a clear error now rather than deep inside TensorRT-LLM's converter
        link(target, self.options.pt)
        self.fetched = {"path": str(target), "bytes": target.stat().st_size}
        self._load_pt()

    def convert(self) -> None:
        from .convert import convert

        self.checkpoint = convert(self.source.spec, self.options.pt, "float16", progress=self.say)
        self.fetched = {"converted_from": self.source.spec}
        self._check_dims()

    def _load_pt(self) -> None:
        from engines.weights.checkpoints import load_checkpoint

        self.checkpoint = load_checkpoint(str(self.options.pt), progress=self.say)
        self._check_dims()

    def _pt_checkpoint(self) -> Checkpoint:
        if self.checkpoint is None:
            raise BuildError("the .pt was neither fetched, linked nor converted")
        return self.checkpoint

    def _check_dims(self) -> None:
        dims = self._pt_checkpoint().dims
        problems = []
        if dims.n_audio_ctx * 2 != ENCODER_INPUT_LEN:
            problems.append(
                f"n_audio_ctx {dims.n_audio_ctx} (the recipe's encoder input is {ENCODER_INPUT_LEN} frames)"
            )
        if self.options.max_seq_len > dims.n_text_ctx:
            problems.append(
                f"--max-seq-len {self.options.max_seq_len} exceeds the model's n_text_ctx {dims.n_text_ctx}"
            )
        if problems:
            raise BuildError(f"{self.options.model}: " + "; ".join(problems))

    def run_command(self, step: Step) -> None:
        argv = list(step.argv)
        self.say("$ " + shlex.join(argv))
        try:
            subprocess.run(argv, check=True)
        except FileNotFoundError as exc:
            raise BuildError(f"{argv[0]}: not found ({exc})") from None
        except subprocess.CalledProcessError as exc:
            raise BuildError(f"`{shlex.join(argv)}` failed with exit status {exc.returncode}") from None

    def write_manifest(self) -> None:
        o = self.options
        vocabulary = o.out / VOCABULARY
        checkpoint = self._pt_checkpoint()
        vocabulary.write_text(json.dumps(checkpoint.vocabulary, ensure_ascii=False), encoding="utf-8")
        self.manifest = build_manifest(o, checkpoint, self.fetched, self.commands)
        tmp = o.out / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(self.manifest, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, o.out / MANIFEST)

    def remove_checkpoint(self) -> None:
        shutil.rmtree(self.options.checkpoint_dir, ignore_errors=True)


def build_manifest(options: BuildOptions, checkpoint, source: dict, commands: list[list[str]]) -> dict:
    """What was built, from what, with which versions and flags, on which GPU."""
    return {
        "format": MANIFEST_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": options.model,
        "name": checkpoint.name if options.model.lower() != BREEZE_REPO.lower() else BREEZE_REPO,
        "source": source,
        "checkpoint": str(options.pt.relative_to(options.out)),  # the torch decoder of trtllm-encoder loads it
        "dims": asdict(checkpoint.dims),
        "suppress_tokens": checkpoint.suppress_tokens,
        "vocabulary": VOCABULARY,
        "components": ["encoder"] if options.encoder_only else ["encoder", "decoder"],
        "options": {
            "dtype": options.dtype,
            "weight_only": options.weight_only,
            "max_batch": options.max_batch,
            "max_beam_width": options.max_beam_width,
            "max_seq_len": options.max_seq_len,
            "max_input_len": options.max_input_len,
            "encoder_input_len": ENCODER_INPUT_LEN,
        },
        "commands": commands,
        "versions": {
            "tensorrt_llm": trtllm_version(),
            "tensorrt_llm_pinned": TRTLLM_VERSION,
            "tensorrt": package_version("tensorrt")
            or package_version("tensorrt-cu12")
            or package_version("tensorrt-cu13"),
            "torch": package_version("torch"),
            "breeze_stream": package_version("breeze-stream"),
            "python": platform.python_version(),
        },
        "gpus": gpu_info(),
        "host": {"machine": platform.machine(), "system": platform.system()},
    }


# ---- command line ------------------------------------------------------------------------------


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help=f"{BREEZE_REPO} (fetches the OpenAI .pt MediaTek publishes), an OpenAI .pt, or anything "
        "--model takes elsewhere (Hugging Face directory or hub id, CTranslate2 directory), converted",
    )
    parser.add_argument("--out", required=True, type=Path, help="engine directory to create")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float16", help="activations and plugins (default %(default)s)"
    )
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument(
        "--int8-weight-only",
        dest="weight_only",
        action="store_const",
        const="int8",
        help="INT8 weight-only quantization (W8A16) of encoder and decoder",
    )
    quant.add_argument(
        "--int4-weight-only",
        dest="weight_only",
        action="store_const",
        const="int4",
        help="INT4 weight-only quantization (W4A16); validate accuracy before use",
    )
    parser.add_argument("--max-batch", type=int, default=64, help="engine max batch size (default %(default)s)")
    parser.add_argument("--max-beam-width", type=int, default=1, help="decoder beams (default %(default)s)")
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=N_TEXT_CTX,
        help="decoder prompt + new tokens (default %(default)s = Whisper's whole context)",
    )
    parser.add_argument(
        "--max-input-len",
        type=int,
        default=14,
        help="decoder prompt tokens (default %(default)s); a vocabulary prompt (--prompt) is trimmed "
        "from the left to fit, so build with up to 228 to keep whole prompts",
    )
    parser.add_argument(
        "--encoder-only", action="store_true", help="build only the encoder (enough for --backend trtllm-encoder)"
    )
    parser.add_argument("--revision", default=BREEZE_REVISION, help="hub revision of Breeze-ASR-25 (default: pinned)")
    parser.add_argument(
        "--trtllm-examples",
        type=Path,
        default=Path(os.environ.get("TRTLLM_WHISPER_EXAMPLES", WHISPER_EXAMPLES)),
        help="TensorRT-LLM's examples/models/core/whisper (default $TRTLLM_WHISPER_EXAMPLES or %(default)s)",
    )
    parser.add_argument("--keep-checkpoint", action="store_true", help="keep the intermediate TensorRT-LLM checkpoint")
    parser.add_argument("--force", action="store_true", help="rebuild over a finished build")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")


def options_from_args(args: argparse.Namespace) -> BuildOptions:
    return BuildOptions(
        model=args.model,
        out=Path(args.out).expanduser().absolute(),
        dtype=args.dtype,
        weight_only=args.weight_only,
        max_batch=args.max_batch,
        max_beam_width=args.max_beam_width,
        max_seq_len=args.max_seq_len,
        max_input_len=args.max_input_len,
        encoder_only=args.encoder_only,
        revision=args.revision,
        examples=Path(args.trtllm_examples).expanduser(),
        keep_checkpoint=args.keep_checkpoint,
        force=args.force,
    )


def run_build(args: argparse.Namespace) -> int:
    try:
        options = options_from_args(args)
        options.validate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(render_plan(options, plan(options)))
        return 0
    problems = preflight(options)
    if problems:
        print("error: cannot build TensorRT-LLM engines here:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        print("(--dry-run prints the commands without running them)", file=sys.stderr)
        return 1
    options.out.mkdir(parents=True, exist_ok=True)
    if options.force:
        (options.out / MANIFEST).unlink(missing_ok=True)
    try:
        manifest = Builder(options).run()
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"built {', '.join(manifest['components'])} in {options.out}; manifest {options.out / MANIFEST}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="breeze-stream build-trtllm", description=__doc__.split("\n\n")[0])
    add_build_arguments(parser)
    return run_build(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
