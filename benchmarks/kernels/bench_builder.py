"""CPU cost of one metadata build per step: ProxyAttnMetadataBuilder vs FlashAttentionMetadataBuilder.

    VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 python benchmarks/kernels/bench_builder.py [--iterations 20000]

Builds the metadata of a few step shapes (decodes, short prefills, a mixed batch) with both
builders on the tiny Llama of ``proxyattn_vllm.testing`` and prints microseconds per build, the best
of five repeats. FA3 AOT scheduling is off for both (no vllm_flash_attn on CPU; on a GPU both
builders call it alike). Needs vLLM (the CPU build is enough).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

PAGE = 128


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=20000,
                    help="builds timed per builder and step shape, split over 5 repeats (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.iterations < 5:
        ap.error("--iterations must be at least 5")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from proxyattn_vllm.metadata import ProxyAttnMetadataBuilder
    from proxyattn_vllm.testing import HEAD_DIM, NUM_KV_HEADS, make_vllm_config, write_tiny_llama

    model_dir = write_tiny_llama(tempfile.mkdtemp())
    cfg = make_vllm_config(model_dir, {"min_sparse_len": 4096}, block_size=PAGE, max_model_len=65536,
                           max_num_seqs=64, max_num_batched_tokens=8192)
    spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_DIM, dtype=torch.float32)
    names = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    dev = torch.device("cpu")
    builders = {
        "FA": FlashAttentionMetadataBuilder(spec, names, cfg, dev),
        "proxyattn": ProxyAttnMetadataBuilder(spec, names, cfg, dev),
    }
    builders["FA"].aot_schedule = False  # as ours on CPU (no vllm_flash_attn here)

    def cm_for(q_lens, seq_lens):
        n = len(q_lens)
        qsl = torch.zeros(n + 1, dtype=torch.int32)
        qsl[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
        seq = torch.tensor(seq_lens, dtype=torch.int32)
        tokens = int(qsl[-1])
        return CommonAttentionMetadata(
            query_start_loc=qsl.clone(), query_start_loc_cpu=qsl, seq_lens=seq.clone(), num_reqs=n,
            num_actual_tokens=tokens, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
            block_table_tensor=torch.zeros(n, 512, dtype=torch.int32),
            slot_mapping=torch.zeros(tokens, dtype=torch.int64), causal=True, seq_lens_cpu_upper_bound=seq)

    cases = {
        "decode x1 (32768)": cm_for([1], [32769]),
        "decode x64 (32768)": cm_for([1] * 64, [32769] * 64),
        "short prefill x4 (q=512, seq 512)": cm_for([512] * 4, [512] * 4),
        "mixed: 8 decodes + 1 long chunk": cm_for([1] * 8 + [4096], [32769] * 8 + [20000]),
    }
    per_repeat = args.iterations // 5
    for name, cm in cases.items():
        row = []
        for bname, builder in builders.items():
            for _ in range(500):
                builder.build(0, cm)
            reps = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(per_repeat):
                    builder.build(0, cm)
                reps.append((time.perf_counter() - t) / per_repeat * 1e6)
            row.append(f"{bname} {min(reps):6.1f} us")
        print(f"{name:38s} " + " | ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
