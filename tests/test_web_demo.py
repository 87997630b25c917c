"""The browser demo (web/) in real headless Chromium, driven by Playwright, against the real server.

Chromium is Debian's (/usr/bin/chromium; `.ci/run` installs it): Playwright never downloads a
browser here. Its fake capture device plays a WAV as the microphone
(`--use-file-for-fake-audio-capture`, 16-bit PCM; the `%noloop` suffix plays it once, then
silence, instead of looping), so the page's whole path runs for real: getUserMedia ->
AudioWorklet -> 16 kHz pcm_s16le frames -> /v1/stream -> partials and finals in the DOM.

- `test_demo_page_with_tiny_model`: the tiny rigged model of conftest (answers 好) with espeak-ng
  speech as the microphone, then the same speech as a chosen file through the file control;
  the server error event and an unreachable server show a human message.
- `test_demo_transcribes_dev_clip` (marker `dev`): the embedded whisper-base and the BreezyVoice
  dev clip as the microphone; waits for finals with the clip's Traditional characters, reports
  the page's first-partial and final latencies, saves a screenshot. With
  BREEZE_WRITE_SCREENSHOT=1 the screenshot also goes to docs/demo.png (the README's).

Every page run asserts that the page logged no console error and threw no exception.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile

from bench.tiny import TINY_TEXT  # what the tiny rigged model says for any audio
from streaming.scoring import score
from streaming.server.app import Server, ServerConfig

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
DEV_DIR = Path(os.environ.get("BREEZE_EVAL_DEV", REPO.parent / "shared" / "eval" / "dev"))
DEV_CLIP = DEV_DIR / "breezyvoice-example.wav"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian chromium not installed at /usr/bin/chromium (apt-get install chromium): the web demo test drives a real browser",
)
async_api = pytest.importorskip("playwright.async_api", reason="playwright (pip) is needed for the web demo test")

# Flags that keep Chromium off the network and quiet in a container.
QUIET_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--disable-breakpad",
    "--metrics-recording-only",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-quic",
    "--autoplay-policy=no-user-gesture-required",
]

FAKE_MIC_FLAGS = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]


def fake_mic_flags(wav: Path, loop: bool = False) -> list[str]:
    return FAKE_MIC_FLAGS + [f"--use-file-for-fake-audio-capture={wav}{'' if loop else '%noloop'}"]


# Characters of the BreezyVoice clip's transcript whose Simplified form differs: a final that
# holds them is Traditional Chinese (the server converts whisper-base's output with s2twp).
TRADITIONAL = "碼學將資訊變為難讀內擁對經過還"
SIMPLIFIED = "码学将资讯变为难读内拥对经过还"


# ----------------------------------------------------------------------------- helpers


@asynccontextmanager
async def running_server(engine):
    async with Server(ServerConfig(host="127.0.0.1", port=0), engine=engine) as server:
        yield f"http://127.0.0.1:{server.port}/"


class PageLog:
    """Console messages and uncaught exceptions of a page."""

    def __init__(self, page) -> None:
        self.messages: list[tuple[str, str]] = []
        page.on("console", lambda m: self.messages.append((m.type, m.text)))
        page.on("pageerror", lambda e: self.messages.append(("pageerror", str(e))))

    def errors(self) -> list[tuple[str, str]]:
        return [(kind, text) for kind, text in self.messages if kind in ("error", "pageerror")]


async def launch(p, *extra: str):
    return await p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=QUIET_FLAGS + list(extra))


async def demo_state(page) -> dict:
    return await page.evaluate("JSON.parse(JSON.stringify(window.breezeDemo))")


async def wait_state(page, states: tuple[str, ...], timeout_s: float) -> str:
    await page.wait_for_function(
        "states => states.includes(window.breezeDemo && window.breezeDemo.state)",
        arg=list(states),
        timeout=timeout_s * 1000,
    )
    return await page.evaluate("window.breezeDemo.state")


async def wait_for(page, condition: str, arg=None, timeout_s: float = 30.0, what: str = "") -> None:
    """Wait until `condition` (a JS function of `arg`) holds; fail at once, with the page's message,
    if the page goes to its error state meanwhile."""
    try:
        await page.wait_for_function(
            f"arg => window.breezeDemo.state === 'error' || ({condition})(arg)", arg=arg, timeout=timeout_s * 1000
        )
    except async_api.TimeoutError:
        state = await demo_state(page)
        pytest.fail(
            f"timed out after {timeout_s:.0f} s waiting for {what or condition}: page status "
            f"{await page.inner_text('[data-testid=status]')!r}, {state['samplesSent'] / 16000:.1f} s of audio sent, "
            f"{state['partials']} partials (last {state['lastPartial']}), finals {[f['text'] for f in state['finals']]}, "
            f"errors {state['errors']}"
        )
    state = await demo_state(page)
    if state["state"] == "error" and not await page.evaluate(f"arg => ({condition})(arg)", arg):
        alert = await page.inner_text('[data-testid="error"]') if await page.is_visible('[data-testid="error"]') else ""
        pytest.fail(
            f"the page went to its error state while waiting for {what or condition}: {alert!r}; "
            f"status {await page.inner_text('[data-testid=status]')!r}"
        )


async def screenshot(page, path: Path) -> None:
    await page.wait_for_timeout(300)  # let the buttons' and meter's CSS transitions settle
    await page.screenshot(path=str(path), full_page=True)


async def finals_texts(page) -> list[str]:
    return await page.eval_on_selector_all('[data-testid="finals"] > *', "els => els.map(e => e.innerText)")


def speech_wav(path: Path) -> Path:
    """espeak-ng speech (16 kHz, 16-bit PCM) between 0.5 s and 2 s of silence."""
    raw = path.with_suffix(".espeak.wav")
    subprocess.run(
        ["espeak-ng", "-v", "en", "-s", "150", "-w", str(raw), "testing the browser demo, one two three four five"],
        check=True,
    )
    audio, sr = soundfile.read(raw, dtype="float32")
    if sr != 16000:
        import soxr

        audio = soxr.resample(audio, sr, 16000)
    audio = np.concatenate([np.zeros(8000, np.float32), audio, np.zeros(32000, np.float32)])
    soundfile.write(path, audio, 16000, subtype="PCM_16")
    return path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- tiny model


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng not installed (apt-get install espeak-ng): the tiny-model page test needs speech-like audio",
)
async def test_demo_page_with_tiny_model(tiny_engine, tmp_path):
    wav = speech_wav(tmp_path / "speech.wav")
    duration = soundfile.info(wav).duration
    async with running_server(tiny_engine) as url, async_api.async_playwright() as p:
        browser = await launch(p, *fake_mic_flags(wav))
        try:
            page = await browser.new_page(viewport={"width": 1000, "height": 860})
            log = PageLog(page)
            await page.goto(url)
            assert await page.get_attribute('[data-testid="status"]', "data-state") == "idle"
            assert await page.is_disabled('[data-testid="stop"]')

            # --- microphone: the fake capture device plays the espeak clip once
            await page.click('[data-testid="start"]')
            await wait_for(page, "() => window.breezeDemo.state === 'streaming'", timeout_s=20, what="streaming")
            assert "streaming" in await page.inner_text('[data-testid="status"]')
            await wait_for(
                page,
                "n => window.breezeDemo.samplesSent >= n",
                arg=int((duration + 0.5) * 16000),
                timeout_s=duration + 20,
                what="the whole WAV sent",
            )
            await wait_for(
                page, "() => document.querySelector('[data-testid=finals] > *') !== null", timeout_s=30, what="a final"
            )
            await page.click('[data-testid="stop"]')
            assert await wait_state(page, ("closed", "error"), 60) == "closed"
            state = await demo_state(page)
            assert state["ended"], "the page must wait for the server's end event"
            assert state["contextRate"] == 16000 and not state["resampling"], "Chromium supports 16 kHz AudioContexts"
            assert state["partials"] >= 1 and state["lastPartial"]["text"] == TINY_TEXT
            finals = state["finals"]
            assert finals and all(f["text"] == TINY_TEXT for f in finals)
            for f in finals:
                assert 0 <= f["start"] < f["end"] <= state["samplesSent"] / 16000 + 0.1
                assert f["latencyMs"] is not None and 0 < f["latencyMs"] < 10_000
            items = await finals_texts(page)
            assert len(items) == len(finals)
            assert re.search(r"\d+\.\d\d–\d+\.\d\d s", items[0]) and "final" in items[0]
            assert TINY_TEXT in items[0]
            assert await page.inner_text('[data-testid="partial"]') == ""  # cleared by the final
            assert await page.is_hidden('[data-testid="error"]')
            await screenshot(page, tmp_path / "tiny-mic.png")

            # --- the same speech as a chosen file, played (muted) through the same worklet path; the
            # page is reloaded with ?resample=worklet: an AudioContext at the device rate and the
            # worklet's own resampler (the path of browsers without 16 kHz contexts)
            await page.goto(f"{url}?resample=worklet")
            await page.set_input_files('[data-testid="file"]', str(wav))
            assert await page.is_checked('input[name="source"][value="file"]')
            await page.uncheck("#audible")
            started = time.monotonic()
            await page.click('[data-testid="start"]')
            assert await wait_state(page, ("closed", "error"), duration + 60) == "closed"  # stops itself at the end
            elapsed = time.monotonic() - started
            state = await demo_state(page)
            assert state["ended"]
            assert state["resampling"] and state["contextRate"] != 16000, state["contextRate"]
            assert elapsed >= duration * 0.9, (
                f"the file must play at real-time pace: {duration:.1f} s took {elapsed:.1f} s"
            )
            assert abs(state["samplesSent"] - duration * 16000) < 0.1 * 16000
            assert [f["text"] for f in state["finals"]] and all(f["text"] == TINY_TEXT for f in state["finals"])
            assert len(await finals_texts(page)) == len(state["finals"])
            await screenshot(page, tmp_path / "tiny-file.png")
            assert log.errors() == [], f"console errors: {log.errors()}"

            # --- a server error event is shown to the person (an unknown language is a bad_request)
            await page.evaluate("""() => {
                const o = document.createElement('option'); o.value = 'tlh'; o.textContent = 'Klingon';
                document.querySelector('[data-testid=language]').append(o);
                document.querySelector('[data-testid=language]').value = 'tlh'; }""")
            await page.check('input[name="source"][value="mic"]')
            await page.click('[data-testid="start"]')
            await page.wait_for_selector('[data-testid="error"]:not([hidden])', timeout=20_000)
            alert = await page.inner_text('[data-testid="error"]')
            assert "bad_request" in alert and "language" in alert, alert
            assert await wait_state(page, ("error",), 10) == "error"
            assert not await page.is_disabled('[data-testid="start"]')

            # --- an unreachable server
            page2 = await browser.new_page()
            await page2.goto(f"{url}?server=ws://127.0.0.1:{closed_port()}/v1/stream")
            await page2.click('[data-testid="start"]')
            await page2.wait_for_selector('[data-testid="error"]:not([hidden])', timeout=20_000)
            assert "Cannot reach the server" in await page2.inner_text('[data-testid="error"]')
            assert await page2.get_attribute('[data-testid="status"]', "data-state") == "error"
        finally:
            await browser.close()


# ----------------------------------------------------------------------------- dev clip, default model


def two_passes(clip: Path, out: Path) -> Path:
    """The clip twice with pauses (16-bit PCM): the second pass's live partial shows under the first's final."""
    audio, sr = soundfile.read(clip, dtype="int16")
    gap = lambda s: np.zeros(int(s * sr), np.int16)  # noqa: E731
    soundfile.write(out, np.concatenate([gap(0.5), audio, gap(1.5), audio, gap(1.5)]), sr, subtype="PCM_16")
    return out


@pytest.mark.dev
@pytest.mark.skipif(
    not DEV_CLIP.exists(),
    reason=f"dev clip not found at {DEV_CLIP} (the shared eval set sits in ../shared next to "
    "the repository; BREEZE_EVAL_DEV points elsewhere)",
)
async def test_demo_transcribes_dev_clip(default_engine, tmp_path):
    reference = next(
        json.loads(line)["text"]
        for line in (DEV_DIR / "manifest.jsonl").read_text().splitlines()
        if line.strip() and json.loads(line)["audio"] == DEV_CLIP.name
    )
    info = soundfile.info(DEV_CLIP)
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), (
        "Chromium's fake capture wants 16-bit PCM"
    )
    wav = two_passes(DEV_CLIP, tmp_path / "two-passes.wav")
    duration = soundfile.info(wav).duration
    async with running_server(default_engine) as url, async_api.async_playwright() as p:
        browser = await launch(p, *fake_mic_flags(wav))
        try:
            page = await browser.new_page(viewport={"width": 1000, "height": 640}, device_scale_factor=1)
            log = PageLog(page)
            await page.goto(url)
            await page.click('[data-testid="start"]')
            await wait_for(page, "() => window.breezeDemo.state === 'streaming'", timeout_s=30, what="streaming")

            # A final with the clip's Traditional characters, while the second pass plays.
            await wait_for(
                page,
                """chars => [...document.querySelectorAll('[data-testid="finals"] > *')]
                                     .some(e => [...chars].some(c => e.innerText.includes(c)))""",
                arg=TRADITIONAL,
                timeout_s=duration + 30,
                what="a final with the clip's Traditional characters",
            )
            # The README's picture: the first final listed, the second pass's partial under way.
            shot = tmp_path / "demo.png"
            try:
                await page.wait_for_function(
                    "() => document.querySelector('[data-testid=partial] .stable') !== null && "
                    "document.querySelector('[data-testid=partial]').innerText.length >= 12",
                    timeout=(duration / 2 + 10) * 1000,
                )
            except async_api.TimeoutError:
                pass
            await screenshot(page, shot)

            # Let the audio play out (then silence: %noloop), stop, and collect every final.
            await wait_for(
                page,
                "n => window.breezeDemo.samplesSent >= n",
                arg=int(duration * 16000),
                timeout_s=duration + 30,
                what="the whole WAV sent",
            )
            await page.click('[data-testid="stop"]')
            assert await wait_state(page, ("closed", "error"), 120) == "closed"
            state = await demo_state(page)
            assert len(await finals_texts(page)) == len(state["finals"])
            await screenshot(page, tmp_path / "demo-done.png")
        finally:
            await browser.close()

    assert log.errors() == [], f"console errors: {log.errors()}"
    assert state["ended"]
    hypothesis = "".join(f["text"] for f in state["finals"])
    assert sum(c in hypothesis for c in TRADITIONAL) >= 5, hypothesis
    assert not any(c in hypothesis for c in SIMPLIFIED), f"Simplified characters in {hypothesis}"
    assert len(state["finals"]) >= 2, (
        f"two passes with a 1.5 s pause between them must give two segments: {state['finals']}"
    )
    cer = score(reference * 2, hypothesis, "zh").rate
    segments = sorted(state["segments"].values(), key=lambda s: s["start"])
    first_partials = [s["firstPartialMs"] for s in segments if s["firstPartialMs"] is not None]
    final_latencies = [f["latencyMs"] for f in state["finals"] if f["latencyMs"] is not None]
    lags = state["partialLagsMs"]
    report = {
        "clip": DEV_CLIP.name,
        "finals": [
            {k: f[k] for k in ("segment", "start", "end", "text", "latencyMs", "firstPartialMs")}
            for f in state["finals"]
        ],
        "cer": cer,
        "first_partial_ms_after_segment_start": first_partials,
        "first_partial_audio_end_s": [s["firstPartialEnd"] for s in segments],
        "first_partial_ms_after_start_click": state["firstPartialAfterClickMs"],
        "first_partial_ms_after_voice_onset": state["firstPartialAfterOnsetMs"],
        "partial_lag_ms_p50": float(np.median(lags)) if lags else None,
        "partial_lag_ms_max": max(lags) if lags else None,
        "final_latency_ms": final_latencies,
        "screenshot": str(shot),
    }
    (tmp_path / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2))
    print(
        f"\nweb demo, {DEV_CLIP.name} twice as the microphone: CER {cer:.1%}; first partial after segment start (ms): "
        f"{[round(x) for x in first_partials]}; after the page's voice onset (-40 dBFS): "
        f"{state['firstPartialAfterOnsetMs']:.0f} ms; after the Start click: {state['firstPartialAfterClickMs']:.0f} ms; "
        f"partial lag p50 {report['partial_lag_ms_p50']:.0f} ms, max {report['partial_lag_ms_max']:.0f} ms; "
        f"final latency (ms): {[round(x) for x in final_latencies]}; {tmp_path / 'report.json'}"
    )
    assert cer < 0.35, f"CER {cer:.1%}: {hypothesis}"
    # Every segment shows a provisional partial before its final. Issue 4's figure (first partial
    # within 1.5 s of the start of speech, CPU) is reported above rather than asserted: on a
    # 2-core machine shared by Chromium and the model it swings from under 1 s to several seconds.
    assert len(first_partials) == len(state["finals"]), "a segment got its final without any partial"

    if os.environ.get("BREEZE_WRITE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "demo.png")
