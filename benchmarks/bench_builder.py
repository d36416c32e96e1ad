"""CPU cost of one metadata build per step: ProxyAttnMetadataBuilder vs FlashAttentionMetadataBuilder.

VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 python benchmarks/bench_builder.py [iterations]
FA3 AOT scheduling is off for both (no vllm_flash_attn on CPU; on a GPU both builders call it alike).
"""
import sys, time, statistics, tempfile
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import torch
from tests._tiny_llama import write_tiny_llama, make_vllm_config, HEAD_DIM, NUM_KV_HEADS
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder
from proxyattn_vllm.metadata import ProxyAttnMetadataBuilder

PAGE = 128
d = write_tiny_llama(tempfile.mkdtemp())
cfg = make_vllm_config(d, {"min_sparse_len": 4096}, block_size=PAGE, max_model_len=65536,
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
    qsl = torch.zeros(n + 1, dtype=torch.int32); qsl[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    T = int(qsl[-1])
    return CommonAttentionMetadata(
        query_start_loc=qsl.clone(), query_start_loc_cpu=qsl, seq_lens=seq.clone(), num_reqs=n,
        num_actual_tokens=T, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        block_table_tensor=torch.zeros(n, 512, dtype=torch.int32),
        slot_mapping=torch.zeros(T, dtype=torch.int64), causal=True, seq_lens_cpu_upper_bound=seq)

cases = {
    "decode x1 (32768)": cm_for([1], [32769]),
    "decode x64 (32768)": cm_for([1] * 64, [32769] * 64),
    "short prefill x4 (q=512, seq 512)": cm_for([512] * 4, [512] * 4),
    "mixed: 8 decodes + 1 long chunk": cm_for([1] * 8 + [4096], [32769] * 8 + [20000]),
}
N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
for name, cm in cases.items():
    row = []
    for bname, b in builders.items():
        for _ in range(500): b.build(0, cm)
        reps = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(N // 5): b.build(0, cm)
            reps.append((time.perf_counter() - t) / (N // 5) * 1e6)
        row.append(f"{bname} {min(reps):6.1f} us")
    print(f"{name:38s} " + " | ".join(row))
