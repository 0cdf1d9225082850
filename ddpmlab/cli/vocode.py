"""``ddpm vocode RUN --audio in.wav``: a recording re-synthesised by a vocoder run from its mel spectrogram.

Every rule (the mel as the run computes it, the sampler call, the scores) lives in
:mod:`ddpmlab.evaluate.vocoder`; this reads the options and says what was written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ddpmlab.cli.options import note, sampling_request
from ddpmlab.cli.parser_sampling import run_options, sampling_options
from ddpmlab.evaluate.audio_quality import GRIFFIN_LIM_ITERATIONS
from ddpmlab.evaluate.vocoder import check_vocoder, compare, format_comparison, read_recording
from ddpmlab.io.sound import write_wav
from ddpmlab.runs import load_run, resolve_device

VOCODE_HELP = """Re-synthesise a recording with a vocoder run (DiffWave with its mel-spectrogram conditioner,
trained with model.condition=mel, e.g. `ddpm train --config vocoder data.path=DIR`): the log-mel
spectrogram of --audio (resampled to the run's data.sample_rate and mixed to its channels, with a note)
is computed with the run's mel settings, and the run draws the waveform from it.

Writes the re-synthesis as a 16-bit WAV (and, beside it, the Griffin-Lim inversion of the same
spectrogram, the baseline: <out>_griffin_lim.wav) and prints, against the original: the multi-
resolution STFT distance (Yamamoto et al. 2020), the mel-cepstral distortion in dB (Kubichek 1993)
and the real-time factor (seconds of computing per second of sound) of both.

Examples:
  ddpm vocode runs/vocoder-... --audio speech.wav
  ddpm vocode runs/vocoder-... --audio speech.wav --out re.wav --sampler ddpm --steps 50
"""


def vocode_parser(sub) -> None:
    v = sub.add_parser("vocode", help="re-synthesise a recording from its mel spectrogram with a vocoder run",
                       description=VOCODE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("run_dir", metavar="RUN_DIR", help="a vocoder run (model.condition=mel)")
    v.add_argument("--audio", required=True, help="the recording: a WAV, FLAC or OGG file")
    v.add_argument("--out", default=None, help="the WAV to write (default RUN_DIR/samples/vocode_<audio name>.wav)")
    v.add_argument("--griffin-lim-iterations", type=int, default=GRIFFIN_LIM_ITERATIONS, metavar="K",
                   help=f"iterations of the Griffin-Lim baseline (default {GRIFFIN_LIM_ITERATIONS})")
    sampling_options(v, conditional=False)
    run_options(v, batch_size=1)
    v.set_defaults(func=cmd_vocode, parser=v)


def cmd_vocode(args) -> int:
    request = sampling_request(args, n=1)
    request.check()
    run = load_run(args.run_dir, args.weights, resolve_device(args.device))
    check_vocoder(run)  # an image run given --audio: one line, before the file is read
    wave, remark = read_recording(args.audio, run)
    if remark:
        note(remark)
    result = compare(run, wave, request, iterations=args.griffin_lim_iterations, progress=not args.no_progress,
                     log=print)
    x = result["diffwave"][0]
    rate = run.cfg.data.sample_rate
    out = Path(args.out) if args.out else run.folder("samples") / f"vocode_{Path(args.audio).stem}.wav"
    write_wav(out, x, rate)
    baseline = write_wav(out.with_name(f"{out.stem}_griffin_lim.wav"), result["griffin_lim"][0], rate)
    print(format_comparison(result, f"{args.audio} ({wave.shape[-1] / rate:.2f} s at {rate} Hz)"))
    print(f"wrote {out} (DiffWave) and {baseline} (Griffin-Lim)")
    return 0
