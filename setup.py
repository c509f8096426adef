"""megatron-grin: GRIN mixture-of-experts pretraining (SparseMixer-v2) on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron-grin",
    version="0.1.0",
    description="GRIN MoE pretraining (SparseMixer-v2, dropless, DP+PP+TP) as a megatron-core plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_grin", "megatron_grin.*"]),
    package_data={"megatron_grin": ["configs/*.yaml"]},
    install_requires=[
        # torch is deliberately unpinned above 2.13 so that an installed CPU or CUDA build is kept.
        "torch>=2.5",
        "megatron-core>=0.16.0,<0.17",
        "transformers>=4.46,<6",
        "safetensors>=0.4",
        "pyyaml>=6",
        "numpy",
        "tqdm",
        "tensorboard",
        "psutil",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "apex": ["apex"],
        "triton": ["triton>=3.0"],
        "wandb": ["wandb"],
        "plot": ["matplotlib"],
        "test": ["pytest>=7", "pytest-timeout", "matplotlib", "triton>=3.0", "wandb"],
    },
    entry_points={"console_scripts": ["megatron-grin=megatron_grin.cli:main"]},
)
