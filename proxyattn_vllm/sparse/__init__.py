"""The sparse attention kernels of a long prefill chunk, behind one interface.

* ``base.py``: :class:`~.base.SparseKernel`, what the impl calls per sparse chunk, and the
  per-layer facts every kernel reads (:class:`~.base.SparseLayer`);
* ``triton.py``: ``sparse_kernel: "triton"``, the block-sparse kernel (each head computes
  exactly its own blocks);
* ``fa3.py``: ``"fa3"``, vLLM's FlashAttention over each query block's union of selected blocks;
* ``flashinfer.py``: ``"flashinfer"``, the same union through FlashInfer's paged prefill;
* ``union.py``: the selection and union page plan the two union kernels share;
* ``choose.py``: which kernel a layer runs (``"auto"`` from ``auto_table.json``, and the fallback
  to Triton where a union kernel cannot run), decided once per layer.
"""
