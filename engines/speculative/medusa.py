"""Medusa heads: cheap draft tokens from the decoder's own last hidden state (Medusa-1).

K heads (default 4) sit on the decoder's last hidden state (after its final layer norm). Head k
is a residual block, ``h + SiLU(W_k h + b_k)`` (or a stack of ``n_layers`` of them, Medusa-1's
``medusa_num_layers``), followed by the model's own (tied) output projection,
``model.decoder.logits``; nothing else is added, so single-block heads for whisper-base are
K x (512 x 512 + 512) parameters (about 2 MB in fp16), and each extra layer adds as much.

Convention (the one thing a caller must get right). Let ``x_0 .. x_t`` be the tokens fed so far
(prompt and generated) and ``h_t`` the decoder's last hidden state at the position of input ``x_t``:

* the base head, ``model.decoder.logits(h_t)``, predicts ``x_{t+1}`` (plain next token);
* Medusa head ``k`` (0-based), ``model.decoder.logits(heads(h_t)[..., k, :])``, predicts
  ``x_{t+k+2}``: head 0 the token *after* the base model's next token, head 1 the one after
  that, and so on.

So after a forward whose last accepted position is ``t``, the draft is
``[argmax base(h_t)] + [argmax head_k(h_t) for k in 0..K-1]`` (or a tree of the top-k of each
head); the first token needs no verification (it is what greedy decoding picks anyway, after
Whisper's logit rules), the rest are verified in the next forward.

The linear layers are initialised to zero, and SiLU(0) = 0, so an untrained head is the
identity: its logits equal the base head's, i.e. it predicts the *next* token again. Training
(engines/speculative/medusa_train.py) moves head k to offset k + 2.

Files: ``save_heads`` / ``load_heads`` keep the weights in safetensors with metadata (format,
n_state, n_heads, base model, training-data recipe, held-out accuracy ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from engines.options import DEFAULT_HEADS

FORMAT = "breeze-stream-medusa/1"
SHIPPED_HEADS = Path(__file__).resolve().parent / "heads" / "whisper-base-medusa4.safetensors"


class ResidualBlock(nn.Module):
    """``h + SiLU(Linear(h))`` with the linear layer zero-initialised (identity at start)."""

    def __init__(self, n_state: int):
        super().__init__()
        self.linear = nn.Linear(n_state, n_state)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: Tensor) -> Tensor:
        w, b = self.linear.weight, self.linear.bias
        return h + F.silu(F.linear(h, w.to(h.dtype), b.to(h.dtype)))


def _head(n_state: int, n_layers: int) -> nn.Module:
    if n_layers == 1:
        return ResidualBlock(n_state)
    return nn.Sequential(*(ResidualBlock(n_state) for _ in range(n_layers)))


class MedusaHeads(nn.Module):
    """K heads on the decoder's last hidden state, each ``n_layers`` residual blocks (Medusa-1's
    ``medusa_num_layers``; 1 is the classic single block, ``blocks[k].linear``).

    ``heads(hidden)``: hidden ``[..., n_state]`` -> per-head hidden ``[..., K, n_state]``; feed it
    to ``model.decoder.logits`` for ``[..., K, n_vocab]`` (see the module docstring for which
    token each head predicts). The parameters may stay in fp32 while the model runs in fp16:
    they are cast to the hidden state's dtype on the fly.
    """

    def __init__(self, n_state: int, n_heads: int = DEFAULT_HEADS, n_layers: int = 1):
        super().__init__()
        if n_heads < 1 or n_layers < 1:
            raise ValueError(f"n_heads and n_layers must be at least 1, got {n_heads} and {n_layers}")
        self.n_state = n_state
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.blocks = nn.ModuleList(_head(n_state, n_layers) for _ in range(n_heads))
        self.meta: dict[str, str] = {}  # what load_heads read from the file

    def forward(self, hidden: Tensor) -> Tensor:
        if hidden.shape[-1] != self.n_state:
            raise ValueError(f"Medusa heads of width {self.n_state} got hidden states of width {hidden.shape[-1]}")
        return torch.stack([block(hidden) for block in self.blocks], dim=-2)

    def logits(self, model, hidden: Tensor) -> Tensor:
        """Per-head logits ``[..., K, n_vocab]`` (float32) through the model's shared output
        projection; ``model`` is an engines.whisper.model.Whisper."""
        return model.decoder.logits(self(hidden))

    @torch.no_grad()
    def topk(self, model, hidden: Tensor, k: int = 1) -> Tensor:
        """Token ids ``[..., K, k]``: the k best candidates of every head (no logit rules applied)."""
        return self.logits(model, hidden).topk(k, dim=-1).indices


def _n_state_of(model_dims) -> int:
    if isinstance(model_dims, int):
        return model_dims
    for name in ("n_text_state", "n_state"):
        if hasattr(model_dims, name):
            return int(getattr(model_dims, name))
    raise TypeError(f"expected ModelDims or an int width, got {type(model_dims).__name__}")


def save_heads(
    path: str | Path, heads: MedusaHeads, meta: Mapping[str, object] | None = None, dtype: torch.dtype = torch.float16
) -> Path:
    """Write the heads as safetensors (fp16 by default) with string metadata.

    Always recorded: format, n_state, n_heads, n_layers. Expected from the caller: base_model (the model
    the heads were trained on), data_recipe (an id of the training data); anything else in
    ``meta`` is kept too (non-strings as JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu", dtype).contiguous() for name, p in heads.state_dict().items()}
    info = {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in (meta or {}).items()}
    info.update(format=FORMAT, n_state=str(heads.n_state), n_heads=str(heads.n_heads), n_layers=str(heads.n_layers))
    info.setdefault("base_model", "unknown")
    info.setdefault("data_recipe", "unknown")
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=info)
    tmp.replace(path)
    return path


def read_heads_meta(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_heads(
    path: str | Path, model_dims, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> MedusaHeads:
    """Heads from a file written by ``save_heads``, checked against the model they will run on.

    ``model_dims``: the model's ModelDims (or its decoder width as an int). Raises ValueError when
    the file is not a heads file or its width differs from the model's decoder width."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Medusa heads file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:
        raise ValueError(f"{path}: not a safetensors file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not a breeze-stream Medusa heads file (format {meta.get('format')!r}, expected {FORMAT!r})"
        )
    n_state, n_heads = int(meta["n_state"]), int(meta["n_heads"])
    want = _n_state_of(model_dims)
    if n_state != want:
        raise ValueError(
            f"{path}: these Medusa heads were trained for a decoder of width {n_state} "
            f"(base model {meta.get('base_model', 'unknown')!r}), but the model's decoder width is "
            f"{want}; train heads for this model with `breeze-stream train-medusa`"
        )
    heads = MedusaHeads(n_state, n_heads, int(meta.get("n_layers", "1")))
    missing, unexpected = heads.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: damaged heads file (missing {sorted(missing)}, unexpected {sorted(unexpected)})")
    heads.meta = meta
    return heads.to(device, dtype).eval()
