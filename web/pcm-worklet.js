// AudioWorklet processor: mono mix -> 16 kHz -> pcm_s16le frames.
//
// Runs on the audio rendering thread. Input arrives in render quanta of 128
// frames at the AudioContext's rate (the global `sampleRate`). When the context
// already runs at 16 kHz (the normal case in Chromium: `new AudioContext({sampleRate:
// 16000})`) samples pass straight through; otherwise a windowed-sinc resampler
// (anti-aliasing low-pass at 0.45 x 16 kHz, Blackman-windowed, table-driven with
// linear interpolation between phases) converts to 16 kHz.
//
// Every full frame (default 640 samples = 40 ms) is posted to the main thread as
// {type: "frame", pcm: ArrayBuffer(Int16 LE), samples: <count in frame>,
//  total: <samples produced so far, including this frame>, rms: <0..1>}.
// The main thread may send {type: "flush"}: the partial frame held so far is
// posted (if any), followed by {type: "flushed", total}.

const OUT_RATE = 16000;

class SincResampler {
  constructor(inRate, outRate) {
    this.ratio = inRate / outRate;            // input samples per output sample
    // Cut-off relative to the input Nyquist: below the output Nyquist with a guard band.
    this.cutoff = Math.min(1, outRate / inRate) * 0.9;
    this.half = Math.ceil(16 / this.cutoff);  // half-width in input samples (16 zero crossings)
    this.phases = 64;                         // table resolution per input sample
    const n = 2 * this.half * this.phases + 1;
    this.table = new Float32Array(n + 1);
    for (let i = 0; i < n; i++) {
      const x = i / this.phases - this.half;  // input-sample offset
      const w = 0.42 + 0.5 * Math.cos(Math.PI * x / this.half) + 0.08 * Math.cos(2 * Math.PI * x / this.half);
      const a = Math.PI * this.cutoff * x;
      const s = x === 0 ? 1 : Math.sin(a) / a;
      this.table[i] = this.cutoff * s * w;
    }
    this.buf = new Float32Array(8192);
    this.len = this.half;    // valid samples in buf: starts with `half` zeros of history
    this.pos = this.half;    // next output position in buf coordinates (= first real input)
  }

  push(input, out) {
    // Append input; emit as many outputs into `out` (array) as the lookahead allows.
    if (this.len + input.length > this.buf.length) {
      const keepFrom = Math.max(0, Math.floor(this.pos) - this.half - 1);
      const kept = this.buf.subarray(keepFrom, this.len);
      const size = Math.max(this.buf.length, (kept.length + input.length) * 2);
      const nb = new Float32Array(size);
      nb.set(kept);
      this.buf = nb;
      this.len = kept.length;
      this.pos -= keepFrom;
    }
    this.buf.set(input, this.len);
    this.len += input.length;
    const { half, phases, table, buf } = this;
    while (this.pos + half < this.len) {
      const t = this.pos;
      const base = Math.floor(t);
      let acc = 0;
      for (let k = base - half + 1; k <= base + half; k++) {
        const x = (t - k + half) * phases;     // table coordinate, >= 0
        const i = x | 0;
        const f = x - i;
        acc += buf[k] * (table[i] + (table[i + 1] - table[i]) * f);
      }
      out.push(acc);
      this.pos += this.ratio;
    }
  }
}

class PcmFrameProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.frameSamples = opts.frameSamples || 640;
    this.resampler = sampleRate === OUT_RATE ? null : new SincResampler(sampleRate, OUT_RATE);
    this.frame = new Int16Array(this.frameSamples);
    this.fill = 0;
    this.total = 0;
    this.sumSq = 0;
    this.scratch = [];
    this.mono = new Float32Array(128);
    this.port.onmessage = (e) => {
      if (e.data && e.data.type === "flush") {
        if (this.fill > 0) this.emit(this.fill);
        this.port.postMessage({ type: "flushed", total: this.total });
      }
    };
    this.port.postMessage({ type: "info", contextRate: sampleRate, resampling: !!this.resampler });
  }

  emit(count) {
    const pcm = this.frame.slice(0, count);
    this.total += count;
    const rms = Math.sqrt(this.sumSq / Math.max(1, count));
    this.port.postMessage({ type: "frame", pcm: pcm.buffer, samples: count, total: this.total, rms }, [pcm.buffer]);
    this.fill = 0;
    this.sumSq = 0;
  }

  write(samples) {
    for (let i = 0; i < samples.length; i++) {
      let v = samples[i];
      if (v > 1) v = 1; else if (v < -1) v = -1;
      this.sumSq += v * v;
      this.frame[this.fill++] = v < 0 ? Math.round(v * 32768) : Math.round(v * 32767);
      if (this.fill === this.frameSamples) this.emit(this.fill);
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;   // nothing connected (yet): keep alive
    const n = input[0].length;
    if (this.mono.length !== n) this.mono = new Float32Array(n);
    const mono = this.mono;
    if (input.length === 1) {
      mono.set(input[0]);
    } else {
      mono.fill(0);
      for (let c = 0; c < input.length; c++) {
        const ch = input[c];
        for (let i = 0; i < n; i++) mono[i] += ch[i];
      }
      const g = 1 / input.length;
      for (let i = 0; i < n; i++) mono[i] *= g;
    }
    if (this.resampler) {
      this.scratch.length = 0;
      this.resampler.push(mono, this.scratch);
      this.write(this.scratch);
    } else {
      this.write(mono);
    }
    return true;
  }
}

registerProcessor("pcm-frame-processor", PcmFrameProcessor);
