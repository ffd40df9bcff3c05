"""PyTorch SDPA on the shapes of benches/attention.rs, for the same-run baseline.

Causal attention, 32 query heads over 4 kv heads (GQA), head dim 128, batch 1, in bf16 (flash)
and f32; median of 20 CUDA-event timings after 5 warm-ups. Prints a markdown table.
"""
import torch
import torch.nn.functional as F

H, KV, D = 32, 4, 128


def time_ms(fn, reps=20, warm=5):
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2], times[0], times[-1]


print("| SDPA | dtype | N | median ms | min-max ms | TFLOP/s |")
print("|---|---|---:|---:|---:|---:|")
for dtype in (torch.bfloat16, torch.float32):
    for n in (512, 2048, 8192):
        q = torch.randn(1, H, n, D, device="cuda", dtype=dtype)
        k = torch.randn(1, KV, n, D, device="cuda", dtype=dtype)
        v = torch.randn(1, KV, n, D, device="cuda", dtype=dtype)
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        med, lo, hi = time_ms(fn)
        flops = 4.0 * D * H * n * (n + 1) / 2
        print(f"| causal GQA | {str(dtype).split('.')[-1]} | {n} | {med:.3f} | {lo:.3f}-{hi:.3f} | {flops / med / 1e9:.1f} |")
