"""CPU analogue of the GPU tensor-parallel check: tensor and pipeline parallelism with the
proxyattn backend.

The real check (TP=2 on two H200s) needs GPUs. Here vLLM's CPU build runs the tiny Llama (4
query heads, 2 KV heads: each of 2 ranks gets 2 query heads and 1 KV head) with
``tensor_parallel_size=2``: vLLM's multiprocessing executor spawns two worker processes that
all-reduce through its CPU communicator (gloo plus its shared-memory all-reduce), the same
executor and model sharding as on GPUs. At full density (gamma 1, no minimum budget) the sparse
path must reproduce dense attention, so TP=2 must give the greedy tokens of TP=1.
``max_num_batched_tokens = 32`` splits every prompt into several chunks, so both ranks run
sparse chunks with ``ctx > 0`` (most of them starting mid-way through a 32-token block).
``pipeline_parallel_size=2`` puts one of the tiny Llama's two layers on each rank, through the
same executor.

Worker processes are fresh interpreters: they see neither ``conftest.py``'s CPU setup (Triton
interpreter fixes, the CPU platform) nor the TEST-ONLY platform patch of ``tests/_vllm_cpu.py``
that makes the CPU platform select proxyattn. A ``sitecustomize`` put on the workers'
``PYTHONPATH`` applies both there (as ``test_robustness_serve.py`` does for its server
processes). The backend itself is registered in every worker by vLLM's general-plugin loading
(``proxyattn_vllm.register``), as on a GPU host.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from tests._vllm_cpu import honour_custom_backend_on_cpu, kv_cache_layout_restored, skip_unless_vllm_on_cpu, tiny_llm

skip_unless_vllm_on_cpu()

REPO = Path(__file__).resolve().parent.parent
TP = 2
PROXYATTN = {"gamma": 1.0, "min_budget_tokens": 0, "min_sparse_len": 48, "block_size": 32, "stride": 4}
ENGINE = dict(block_size=16, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=128)
MAX_TOKENS = 6
# Runs first in every spawned worker: the CPU test setup of conftest.py and the platform patch.
SITECUSTOMIZE = """
import tests.conftest
from tests._vllm_cpu import honour_custom_backend_on_cpu

honour_custom_backend_on_cpu()
"""


def _why_no_tp_on_cpu() -> str | None:
    """Why TP=2 cannot run here (None if it can). vLLM's CPU platform initialises its process
    groups with gloo (``CpuPlatform.dist_backend``); nothing else is required: with
    ``VLLM_CPU_OMP_THREADS_BIND=nobind`` the two ranks also run (slower) on a single core."""
    import torch.distributed

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "this torch build has no gloo backend, which vLLM's CPU platform needs for TP > 1"
    return None


_NO_TP = _why_no_tp_on_cpu()
pytestmark = pytest.mark.skipif(_NO_TP is not None, reason=_NO_TP or "")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from proxyattn_vllm import testing

    assert testing.NUM_KV_HEADS == TP  # one KV head per rank
    return str(testing.write_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """Prompts of 70, 90 and 110 tokens: 3-4 chunks each, every chunk after the first sparse."""
    from proxyattn_vllm.testing import prompt_words

    return [prompt_words(300 + 53 * i, 70 + 20 * i) for i in range(3)]


@pytest.fixture
def tp_workers_on_cpu(tmp_path, monkeypatch):
    """The CPU test setup and the platform patch in this process and in spawned workers."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [
        str(site_dir), str(REPO), os.environ.get("PYTHONPATH")])))
    # vLLM's automatic OpenMP binding wants a NUMA node per rank ("Not enough allowed NUMA
    # nodes", utils/ompmultiprocessing.py); CI has one node and two cores: bind nothing, and
    # give each rank one thread.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # With tp > 1, VocabParallelEmbedding masks token ids with a helper that vLLM wraps in
    # torch.compile (inductor: a C++ build, 15-20 s per worker on 2 cores). Eager computes the
    # same mask; the model itself runs eager anyway (enforce_eager).
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    honour_custom_backend_on_cpu(monkeypatch.setattr)
    with kv_cache_layout_restored():
        yield


@contextlib.contextmanager
def _proxyattn_llm(model_dir: str, proxyattn: dict, tp: int, pp: int = 1):
    """A proxyattn ``LLM`` on ``tp`` x ``pp`` ranks (one: in this process), shut down on exit.

    The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, conftest.py) and
    gc-freezes what it built, so dropping the ``LLM`` does not stop its workers: its
    ``shutdown`` does (the worker processes exit, ``gc.unfreeze``)."""
    parallel = {} if tp * pp == 1 else dict(tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                            distributed_executor_backend="mp")
    with tiny_llm(model_dir, attention_backend="proxyattn", additional_config={"proxyattn": proxyattn},
                  **parallel, **ENGINE) as llm:
        try:
            yield llm
        finally:
            llm.llm_engine.engine_core.shutdown()


def _generate(llm, prompts: list[str]) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outs]


# Both run inside the workers (``LLM.collective_rpc``; the worker is the first argument).
def _start_recording_sparse_calls(worker) -> int:
    """Wrap ``sparse_prefill`` in this worker to record each call's ``(ctx, q_len)``."""
    import proxyattn_vllm.sparse.triton as triton_module

    calls: list[tuple[int, int]] = []
    original = triton_module.sparse_prefill

    def recording(query, kv_cache, block_table_row, output, ctx, *args, **kwargs):
        calls.append((ctx, query.shape[0]))
        return original(query, kv_cache, block_table_row, output, ctx, *args, **kwargs)

    triton_module.sparse_prefill = recording
    triton_module._test_recorded_sparse_calls = calls
    return os.getpid()


def _rank_report(worker) -> dict:
    """This rank's TP and PP coordinates, its attention layers' names and impls' head counts,
    its recorded sparse calls."""
    import proxyattn_vllm.sparse.triton as triton_module
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    layers = {name: layer for name, layer in worker.model_runner.compilation_config.static_forward_context.items()
              if hasattr(layer, "impl")}
    return {
        "tp": (get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()),
        "pp": (get_pp_group().rank_in_group, get_pp_group().world_size),
        "layers": sorted(layers),
        "impls": [(type(layer.impl).__name__, layer.impl.num_heads, layer.impl.num_kv_heads)
                  for layer in layers.values()],
        "sparse_calls": list(getattr(triton_module, "_test_recorded_sparse_calls", [])),
    }


def test_tp2_matches_tp1_at_full_density(model_dir, prompts, tp_workers_on_cpu):
    with _proxyattn_llm(model_dir, PROXYATTN, tp=1) as llm:
        tp1 = _generate(llm, prompts)
    with _proxyattn_llm(model_dir, PROXYATTN, tp=TP) as llm:
        pids = llm.collective_rpc(_start_recording_sparse_calls)
        tp2 = _generate(llm, prompts)
        reports = llm.collective_rpc(_rank_report)

    assert len(set(pids) | {os.getpid()}) == TP + 1  # really separate worker processes
    assert all(len(tokens) == MAX_TOKENS for tokens in tp1)
    assert tp2 == tp1
    assert [r["tp"] for r in reports] == [(rank, TP) for rank in range(TP)]
    for report in reports:
        # Every layer is proxyattn with this rank's share of the heads (4/2 query, 2/2 KV).
        assert report["impls"] == [("ProxyAttnImpl", 2, 1)] * 2, report
        # Every rank ran the sparse path on chunks after the first, also mid-block.
        ctxs = {ctx for ctx, _ in report["sparse_calls"]}
        assert ctxs and min(ctxs) > 0, report
        assert any(ctx % PROXYATTN["block_size"] for ctx in ctxs), report
    assert reports[0]["sparse_calls"] == reports[1]["sparse_calls"]


def test_num_proxy_groups_checked_against_kv_heads_per_rank(model_dir, tp_workers_on_cpu, capfd):
    """2 proxy groups fit the model's 2 KV heads (TP=1) but not the 1 KV head per rank at TP=2:
    startup must stop. vLLM's executor raises its generic "WorkerProc initialization failed";
    the worker's log (what a user sees above it) carries our message."""
    from proxyattn_vllm import ProxyAttnConfig

    proxyattn = {**PROXYATTN, "num_proxy_groups": 2}
    assert ProxyAttnConfig.from_dict(proxyattn).kernel_params(4, 2).num_groups == 2  # fine at TP=1
    with pytest.raises(Exception, match="WorkerProc initialization failed"):
        with _proxyattn_llm(model_dir, proxyattn, tp=TP):
            pass
    out, err = capfd.readouterr()
    log = out + err
    # The traceback's last line in the worker's log: "... ProxyAttnConfigError: proxyattn config: ..."
    message = next((line for line in log.splitlines() if "ProxyAttnConfigError: " in line), None)
    assert message is not None, log[-6000:]
    for part in ("num_proxy_groups=2", "1 KV heads per rank", "[1]"):
        assert part in message, message


def _why_no_pp_on_cpu() -> str | None:
    """vLLM 0.26's CPU build fails pipeline parallelism with its own attention backend too (the
    first rank's worker: "'_StreamPlaceholder' object has no attribute 'record_event'"); 0.32's runs it."""
    from proxyattn_vllm.vllm_version import installed_vllm_version

    version = installed_vllm_version()
    if version.startswith("0.26."):
        return f"vLLM {version}'s CPU build cannot run pipeline parallelism (its own backend fails alike)"
    return None


_NO_PP = _why_no_pp_on_cpu()


@pytest.mark.skipif(_NO_PP is not None, reason=_NO_PP or "")
def test_pp2_ranks_run_their_layers_by_the_models_layer_index(model_dir, prompts, tp_workers_on_cpu):
    """Pipeline parallelism: each of 2 ranks holds one of the 2 layers, under its index in the
    whole model, so ``dense_layers`` [1] makes rank 1's only layer dense and leaves rank 0's
    sparse (an index counted per rank would make both sparse). At full density PP=2 gives the
    greedy tokens of one rank."""
    proxyattn = {**PROXYATTN, "dense_layers": [1]}
    with _proxyattn_llm(model_dir, proxyattn, tp=1) as llm:
        single = _generate(llm, prompts)
    with _proxyattn_llm(model_dir, proxyattn, tp=1, pp=2) as llm:
        pids = llm.collective_rpc(_start_recording_sparse_calls)
        pp2 = _generate(llm, prompts)
        reports = llm.collective_rpc(_rank_report)

    assert len(set(pids) | {os.getpid()}) == 2 + 1  # really separate worker processes
    assert all(len(tokens) == MAX_TOKENS for tokens in single)
    assert pp2 == single
    assert [(r["pp"], r["layers"]) for r in reports] == [
        ((rank, 2), [f"model.layers.{rank}.self_attn.attn"]) for rank in range(2)]
    ctxs = {ctx for ctx, _ in reports[0]["sparse_calls"]}
    assert ctxs and min(ctxs) > 0 and any(ctx % PROXYATTN["block_size"] for ctx in ctxs), reports[0]
    assert reports[1]["sparse_calls"] == [], "layer 1 is in dense_layers"
