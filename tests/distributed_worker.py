"""One rank of the multi-process tests in test_distributed.py, started by torchrun (or by hand with the
environment variables torchrun sets): `python tests/distributed_worker.py MODE OUT_DIR`.

MODE `cases`: every case below on the tiny demo pipeline; each rank writes what it got to
OUT_DIR/rank<r>.safetensors. MODE `die` / `hang`: rank 1 exits, or sleeps, right after joining; rank 0
then tries a step's all-reduce and must fail with a clear error within the timeout.
"""

import os
import sys
import time

import numpy as np
import torch
from safetensors.torch import save_file

from musev_lite import distributed
from musev_lite.pipeline import MuseVPipeline

IMAGE = np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)
FAST = dict(steps=2, first_frame_steps=2, context_frames=4, context_overlap=1, seed=5)
# 9 new frames in windows of 4, 4 and 3 (uneven), split over the ranks
CASES = {
    "i2v": dict(image=IMAGE, num_frames=9),
    "i2v_window_batch": dict(image=IMAGE, num_frames=9, window_batch=2),
    "t2i2v": dict(num_frames=10, height=64, width=64),
    "shots": dict(image=IMAGE, num_frames=5, n_batch=2),
}


def run_case(pipe: MuseVPipeline, name: str):
    return pipe("a face", negative_prompt="V1", **CASES[name], **FAST)


def main():
    mode, out = sys.argv[1], sys.argv[2]
    ranks = distributed.init("cpu")
    try:
        if mode == "cases":
            pipe = MuseVPipeline.demo(seed=0)
            tensors = {}
            for name in CASES:
                result = run_case(pipe, name)
                tensors[f"{name}.latents"] = result.latents
                tensors[f"{name}.frames"] = torch.from_numpy(result.frames)
            save_file(tensors, os.path.join(out, f"rank{ranks.rank}.safetensors"))
        elif ranks.rank == 1:
            if mode == "die":
                os._exit(3)
            time.sleep(300)  # hang: the test kills this rank
        else:
            ranks.all_reduce(torch.ones(4), "denoising step 1/2")
    except distributed.RankLostError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
