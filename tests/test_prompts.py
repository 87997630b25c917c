"""Previous-text prompts (<|startofprev|> + text before <|startoftranscript|>) in the engine:
the tokenizer against the reference tokenizer, the prompt layout and cap, prompted decoding
against transformers' Whisper, exact speculation and batching with prompts of any lengths."""

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from engines.batching import Batch, Decoder, Sequence
from engines.gpu.cuda_graphs import GraphOptions
from engines.speculative.drafts import HypothesisDrafter, MedusaDrafter
from engines.speculative.medusa import MedusaHeads
from engines.weights.checkpoints import default_files, default_suppress_ids, default_vocabulary, hf_dims, hf_to_openai
from engines.whisper.decoding import DecodingOptions, LogitFilter, segment_prompt
from engines.whisper.model import Whisper
from engines.whisper.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

PROMPTS = ["聯發科 Breeze 台積電", "客服中心：信用卡、帳單、分期付款、紅利點數、ATM 轉帳、e-mail 通知。" * 3, ""]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(default_vocabulary())


@pytest.fixture(scope="module")
def reference_tokenizer():
    """The Hugging Face tokenizer of the embedded model's own tokenizer.json."""
    return tokenizers.Tokenizer.from_file(str(default_files()[0]["tokenizer.json"]))


@pytest.mark.parametrize(
    "text",
    [
        " 聯發科 Breeze-ASR-25 台積電",
        "Hello world, it's 3.5 e-mail!",
        " 在密碼學中,加密是將明文資訊改變為難以讀取的密文",
        "  spaces   here\n\tand a newline",
        " 賴清德 蔡英文 TSMC NVIDIA's H100",
        "😀 ㄅㄆㄇ 〇一二三 ²³ Ⅻ",
        " 中文English混合123abc",
    ],
)
def test_encode_matches_the_reference_tokenizer(tok, reference_tokenizer, text):
    ids = tok.encode(text)
    assert ids == reference_tokenizer.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


def test_segment_prompt_layout_and_cap(tok):
    start = tok.prompt("zh")
    assert segment_prompt(tok, "zh", DecodingOptions(), 448) == (start, 0)
    assert segment_prompt(tok, "zh", DecodingOptions(prompt="  "), 448) == (start, 0)
    tokens, prefix = segment_prompt(tok, "zh", DecodingOptions(prompt=" 台積電 "), 448)
    assert tokens == [tok.sot_prev, *tok.encode(" 台積電"), *start] and prefix == len(tokens) - len(start)
    assert tokens[prefix] == tok.sot

    words = " ".join(f"w{i}" for i in range(400))  # ~800 tokens: far past the cap
    tokens, prefix = segment_prompt(tok, "zh", DecodingOptions(prompt=words), 448)
    assert prefix == 1 + 223 and tokens[1:prefix] == tok.encode(" " + words)[-223:]  # trimmed from the left
    assert tok.decode(tokens[1:prefix]).endswith("w398 w399")

    # the previous text comes after the prompt and gives way first; the prompt's terms stay
    options = DecodingOptions(prompt="台積電", previous_text=words)
    tokens, prefix = segment_prompt(tok, "zh", options, 448)
    fixed = tok.encode(" 台積電")
    assert prefix == 224 and tokens[1 : 1 + len(fixed)] == fixed
    assert tokens[1 + len(fixed) : prefix] == tok.encode(" " + words)[-(223 - len(fixed)) :]
    assert segment_prompt(tok, "zh", options, 448, max_text=10)[1] == 11
    assert segment_prompt(tok, "zh", options, 448, max_text=0) == (start, 0)


# -- prompted decoding against transformers ------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    """A tiny random transformers Whisper, and ours with the same weights."""
    torch.manual_seed(3)
    config = transformers.WhisperConfig(
        vocab_size=51865,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=256,
        decoder_ffn_dim=256,
        max_source_positions=1500,
        max_target_positions=448,
    )
    hf = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)  # varied outputs that do not collapse into a loop at once
    dims = hf_dims(hf.config.to_dict())
    ours = Whisper(dims)
    ours.load_state_dict(hf_to_openai(hf.state_dict()))
    return hf, ours.eval()


@pytest.fixture(scope="module")
def decoder(models) -> Decoder:
    return Decoder(models[1], Tokenizer(default_vocabulary()), default_suppress_ids())


def mel(batch: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, 80, 3000)


@torch.inference_mode()
def reference_greedy(hf, reference_tokenizer, tok: Tokenizer, mel: torch.Tensor, prompt: str, options: DecodingOptions):
    """Greedy decoding the slow way, in transformers: the whole sequence at every step, the prompt
    built from the reference tokenizer. Returns (tokens, no-speech probability, sum of log-probs)."""
    prefix = (
        [tok.sot_prev] + reference_tokenizer.encode(" " + prompt.strip(), add_special_tokens=False).ids
        if prompt
        else []
    )
    forced = prefix + tok.prompt("zh")
    rules = LogitFilter(tok, default_suppress_ids(), 51865, options, torch.device("cpu"))
    generated: list[int] = []
    no_speech, logprob = 0.0, 0.0
    for _ in range(options.max_new_tokens):
        logits = hf(input_features=mel, decoder_input_ids=torch.tensor([forced + generated])).logits[0]
        if not generated:
            no_speech = logits[len(prefix)].softmax(-1)[tok.no_speech].item()
        logprobs = rules.apply(logits[-1:], [generated]).log_softmax(-1)[0]
        token = int(logprobs.argmax())
        generated.append(token)
        logprob += logprobs[token].item()
        if token == tok.eot:
            break
    return generated, no_speech, logprob


def test_prompted_greedy_matches_transformers(models, decoder, reference_tokenizer):
    """Rows with prompts of different lengths decoded together: each gives transformers' tokens,
    its no-speech probability (at <|startoftranscript|>, after the prompt) and log-probabilities."""
    hf, ours = models
    tok = decoder.tokenizer
    mels = mel(3, seed=1)
    with torch.inference_mode():
        feats = ours.encoder(mels)
    base = DecodingOptions(max_new_tokens=12)
    running = Batch(ours, tok, decoder.suppress_tokens, rows=3)
    seqs = []
    for prompt in PROMPTS:
        options = replace(base, prompt=prompt)
        tokens, prefix = segment_prompt(tok, "zh", options, 448)
        seqs.append(Sequence(tokens, "zh", options, [], frames=1500, prefix=prefix))
    running.admit(feats, seqs)
    while running.active:
        running.step()
    unprompted = decoder.decode(feats[:2], base)
    for b, (seq, prompt) in enumerate(zip(seqs, PROMPTS)):
        tokens, no_speech, logprob = reference_greedy(hf, reference_tokenizer, tok, mels[b : b + 1], prompt, base)
        result = seq.result(tok)
        assert result.tokens == [t for t in tokens if t != tok.eot]
        assert result.no_speech_prob == pytest.approx(no_speech, abs=1e-4)
        assert result.avg_logprob == pytest.approx(logprob / (len(tokens) + 1), abs=1e-4)
    assert [s.result(tok).tokens for s in seqs[:2]] != [r.tokens for r in unprompted]  # the prompts changed something


def test_beam_search_takes_the_prompt(models, decoder, reference_tokenizer):
    """Beam search's no-speech probability comes from <|startoftranscript|> after the prompt too."""
    hf, ours = models
    with torch.inference_mode():
        feats = ours.encoder(mel(1, seed=2))
    options = DecodingOptions(max_new_tokens=8, beam_size=2, prompt=PROMPTS[0])
    result = decoder.decode(feats, options)[0]
    _, no_speech, _ = reference_greedy(
        hf, reference_tokenizer, decoder.tokenizer, mel(1, seed=2), PROMPTS[0], DecodingOptions(max_new_tokens=1)
    )
    assert result.no_speech_prob == pytest.approx(no_speech, abs=1e-4)
    assert result.tokens and decoder.tokenizer.sot_prev not in result.tokens


def test_speculation_with_a_prompt_is_plain_greedy(models, decoder):
    """Hypothesis drafts and Medusa trees start after the prompt: the output stays greedy's."""
    ours = models[1]
    torch.manual_seed(7)
    heads = MedusaHeads(ours.dims.n_text_state, 4)
    with torch.no_grad():
        for block in heads.blocks:
            block.linear.weight.normal_(0, 0.05)
    with torch.inference_mode():
        feats = ours.encoder(mel(3, seed=4))
    options = DecodingOptions(max_new_tokens=40, prompt=PROMPTS[1])
    plain = decoder.decode(feats, options)
    half = [r.tokens[: len(r.tokens) // 2] + [11, 12] for r in plain]
    drafters = [
        [MedusaDrafter(ours, heads)],
        [HypothesisDrafter(half[1]), MedusaDrafter(ours, heads)],
        [HypothesisDrafter(plain[2].tokens)],
    ]
    spec = decoder.decode(feats, options, drafters)
    assert [r.tokens for r in spec] == [r.tokens for r in plain]
    assert spec[0].draft_proposed["medusa"] > 0
    assert spec[1].draft_accepted["hypothesis"] >= len(half[1]) - 3
    assert spec[2].forwards < plain[2].forwards


# -- the running batch: prompts of different lengths, eager and bucketed (the CUDA-graph step) ----


BATCH_PROMPTS = [PROMPTS[0], PROMPTS[2], PROMPTS[1], "台積電"]


@pytest.fixture(scope="module")
def alone(models, decoder):
    """Features of four segments and each one's result decoded by itself, in a batch of its own."""
    ours, tok = models[1], decoder.tokenizer
    with torch.inference_mode():
        feats = ours.encoder(mel(4, seed=5)[:, :, :400])
    results = []
    for b, prompt in enumerate(BATCH_PROMPTS):
        options = DecodingOptions(max_new_tokens=24, prompt=prompt, timestamps=b == 1)
        tokens, prefix = segment_prompt(tok, "zh", options, 448)
        single = Batch(ours, tok, decoder.suppress_tokens, rows=1)
        seq = Sequence(tokens, "zh", options, [], frames=feats.shape[1] - 25 * b, prefix=prefix)
        single.admit(feats[b : b + 1, : feats.shape[1] - 25 * b], [seq])
        while single.active:
            single.step()
        results.append(seq.result(tok))
    return feats, results


@pytest.mark.parametrize(
    "graphs,speculative",
    [
        (None, False),
        (None, True),
        (GraphOptions(mode="eager"), False),
        (GraphOptions(mode="eager"), True),
        ("row kernels", True),
    ],
)
def test_a_batch_of_different_prompts_gives_each_row_what_it_gives_alone(models, decoder, alone, graphs, speculative):
    """Prompts of 0, 8 and 100+ tokens (one row with timestamps, each with its own window length)
    share the batch, admitted at different steps: the plain batch, the bucketed step a CUDA graph
    replays (its prompts fed before the step that takes their <|startoftranscript|> sequence), and
    that step through the Triton row kernels."""
    if graphs == "row kernels":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the CPU form of the row kernels needs Triton's interpreter (conftest sets it without a GPU)")
        graphs = GraphOptions(mode="eager", row_kernels=True)
    ours, tok = models[1], decoder.tokenizer
    model = ours
    if graphs is not None and graphs.row_kernels:
        model = Whisper(ours.dims).eval()
        model.load_state_dict(ours.state_dict())
        model.fuse()
    feats, expected = alone
    seqs = []
    for b, prompt in enumerate(BATCH_PROMPTS):
        options = DecodingOptions(max_new_tokens=24, prompt=prompt, timestamps=b == 1)
        tokens, prefix = segment_prompt(tok, "zh", options, 448)
        old = expected[b].tokens
        drafters = [HypothesisDrafter(old[:4] + [11] + old[5:])] if speculative else []
        seqs.append(Sequence(tokens, "zh", options, drafters, frames=feats.shape[1] - 25 * b, prefix=prefix))
    batch = Batch(model, tok, decoder.suppress_tokens, rows=4, graphs=graphs)
    step = 0
    while step <= 2 or batch.active:
        if step == 0:
            batch.admit(feats[:2], seqs[:2])
        if step == 2:
            batch.admit(feats[2:], seqs[2:])
        batch.step()
        step += 1
    together = [s.result(tok) for s in seqs]
    assert [r.tokens for r in together] == [r.tokens for r in expected]
    assert np.allclose([r.no_speech_prob for r in together], [r.no_speech_prob for r in expected], atol=1e-5)
    assert np.allclose([r.avg_logprob for r in together], [r.avg_logprob for r in expected], atol=1e-4)
    if speculative:
        assert all(r.draft_accepted["hypothesis"] > 0 for r in together)
    if graphs is not None and graphs.row_kernels:
        assert any(b * w <= 16 for b, w, *_ in batch.runner.stats.keys)  # steps through the row kernels ran
