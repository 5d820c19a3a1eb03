"""Peak resident memory of a whole `python -m musev_lite.run` against the video's length: it should stay
flat, since shots are decoded and streamed to the mp4 encoder as they finish (issue #12).

    python bench/stream_memory.py [--frames 12,120,1200] [--formats mp4]

The demo configuration (`tiny` preset, examples/face.png, 128x96) with 1 sampler step, 12 new frames
per shot and `n_batch` shots for the length asked; each length runs in a fresh process, which prints its
peak resident set (VmHWM, Linux) when done. The table gives each length's peak and its ratio to the
shortest's; the machine's load is printed (other processes do not change a process's own peak).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import sys
from pathlib import Path
from musev_lite import run
code = run.main(sys.argv[1:])
peak = next(l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM:'))
print('PEAK', int(peak.split()[1]) * 1024, code, file=sys.stderr)
"""


def peak_rss(frames: int, formats: str, out: Path) -> tuple[int, float]:
    shots, per_shot = max(1, frames // 12), min(frames, 12)
    args = [sys.executable, "-c", CHILD, str(REPO / "examples/demo.toml")]
    for item in ["generation.steps=1", f"generation.num_frames={per_shot}", f"generation.n_batch={shots}",
                 "generation.context_frames=12", "generation.context_overlap=4", f"output.formats={formats}",
                 f"output.dir={out}", f"output.name=v{frames}", "output.contact_sheet=false"]:
        args += ["--set", item]
    started = time.monotonic()
    done = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = [l for l in done.stderr.splitlines() if l.startswith("PEAK")]
    if not line or line[0].split()[2] != "0":
        sys.exit(f"the run of {frames} frames failed:\n{done.stderr[-2000:]}")
    return int(line[0].split()[1]), time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default="12,120,1200")
    parser.add_argument("--formats", default='["mp4"]', help='output.formats, e.g. \'["mp4", "png"]\'')
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for frames in [int(f) for f in args.frames.split(",")]:
            peak, seconds = peak_rss(frames, args.formats, Path(out))
            rows.append((frames, peak, seconds))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"| frames written (+1 condition frame) | peak RSS | vs {rows[0][0]} frames | run time |")
    print("|---|---|---|---|")
    for frames, peak, seconds in rows:
        print(f"| {frames} | {peak / 2**20:.0f} MiB | {peak / rows[0][1]:.3f} | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
