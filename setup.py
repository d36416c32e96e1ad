from setuptools import setup

setup(
    name="proxyattn-vllm",
    version="0.1.0",
    description="ProxyAttn training-free block-sparse prefill as a vLLM attention backend",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # kernels/ is installed as `proxyattn_kernels`: a top-level `kernels` would clash with PyPI's.
    packages=[
        "proxyattn_vllm",
        "proxyattn_kernels",
        "proxyattn_kernels.proxy_scores",
        "proxyattn_kernels.budget",
        "proxyattn_kernels.select",
        "proxyattn_kernels.block_sparse_attn",
    ],
    # The load-test client lives in benchmarks/ (runnable as a script there) and is installed
    # as the module proxyattn_benchmarks.loadtest for the `proxyattn-loadtest` command.
    py_modules=["proxyattn_benchmarks.loadtest"],
    package_dir={"proxyattn_kernels": "kernels", "proxyattn_benchmarks": "benchmarks"},
    install_requires=["torch>=2.11", "triton>=3.6"],
    entry_points={
        "vllm.general_plugins": ["proxyattn = proxyattn_vllm:register"],
        "console_scripts": ["proxyattn-loadtest = proxyattn_benchmarks.loadtest:main"],
    },
    extras_require={
        "vllm": ["vllm==0.26.0"],
        # sparse_kernel "flashinfer": the release vLLM 0.26 pins (its kernels compile at first use).
        "flashinfer": ["flashinfer-python==0.6.14"],
        "test": ["pytest>=8", "numpy<2.4", "pyyaml"],
    },
)
