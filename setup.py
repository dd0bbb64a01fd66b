from setuptools import find_packages, setup

setup(
    name="hpm_video",
    version="0.1.0",
    description="Masked video pretraining with Hard Patches Mining (HPM)",
    packages=find_packages(include=["hpm_video", "hpm_video.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm>=1.0",
        "einops",
        "av>=12",
        "deepspeed>=0.15",
        "fvcore",
        "numpy",
        "pillow",
        "pyyaml",
        "safetensors",
        "tensorboard",
        "tqdm",
    ],
    extras_require={
        "decord": ["decord>=0.6"],
        "hf": ["transformers>=4.40"],
        "dev": ["pytest", "pytest-timeout", "ruff", "scikit-video", "transformers>=4.40", "decord>=0.6"],
    },
)
