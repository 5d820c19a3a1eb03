"""Why attention goes through F.scaled_dot_product_attention: its kernel against the plain
matmul-softmax-matmul, at the reference-only self-attention shapes of a MuseV window.

    python bench/bench_attention.py [--tokens 640] [--head-dim 40]

(batch 26 = 2 guidance halves x 13 frames, 8 heads, keys = own tokens + the condition frame's.)
"""

import argparse

import torch
import torch.nn.functional as F
from timing import seconds_per_call



def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=640, help="latent h*w of one frame (640 = 256x160 px)")
    parser.add_argument("--head-dim", type=int, default=40, help="40 at SD1.5's first level")
    args = parser.parse_args()
    b, heads, n, d = 26, 8, args.tokens, args.head_dim
    q, k, v = torch.randn(b, heads, n, d), torch.randn(b, heads, 2 * n, d), torch.randn(b, heads, 2 * n, d)

    def plain():
        weights = (q @ k.transpose(-1, -2) * d**-0.5).softmax(-1)
        return weights @ v

    with torch.no_grad():
        assert torch.allclose(F.scaled_dot_product_attention(q, k, v), plain(), atol=1e-5)
        fused, _ = seconds_per_call(lambda: F.scaled_dot_product_attention(q, k, v))
        reference, _ = seconds_per_call(plain)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; q {tuple(q.shape)}, k/v {tuple(k.shape)}")
    print(f"matmul-softmax-matmul: {reference * 1e3:.0f} ms   scaled_dot_product_attention: {fused * 1e3:.0f} ms"
          f"   speed-up x{reference / fused:.2f}")


if __name__ == "__main__":
    main()
