"""Packaging for stepvideo.

torch is deliberately left unpinned: GPU hosts bring their own build (for example
torch 2.11 on Python 3.12). CI pins the CPU wheel through ``constraints-ci.txt``.
"""
from setuptools import find_packages, setup

# diffusers' pipelines and caches on our models (stepvideo.diffusers, --cache); 0.38: newer
# releases need huggingface-hub >= 1.x, which transformers 4.48 does not accept
DIFFUSERS = ["diffusers>=0.38,<0.39", "huggingface-hub<1.0"]

setup(
    name="stepvideo",
    version="0.1.0",
    description="Inference toolkit for the Step-Video T2V / TI2V models",
    license="MIT",
    python_requires=">=3.10",
    # assets/ (the demo images, one copy in the repository) is installed as stepvideo/assets/
    packages=find_packages(include=["stepvideo", "stepvideo.*"]) + ["stepvideo.assets"],
    package_dir={"stepvideo.assets": "assets"},
    package_data={"stepvideo.assets": ["*.png", "README.md"], "stepvideo.job_server": ["ui/*.html"]},
    install_requires=[
        "torch>=2.3",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "sentencepiece>=0.1.99",
        "transformers>=4.39.1",
        "flask>=2.2",
        "waitress>=2.1",
        "requests",
        "pillow",
        "imageio>=2.30",
        "imageio-ffmpeg>=0.4.9",
        "prometheus_client>=0.16",
    ],
    extras_require={
        "hub": ["huggingface_hub>=0.20"],
        "diffusers": DIFFUSERS,
        # the OpenAI SDK, a real browser (Selenium) and stock diffusers are acceptance tests
        "test": ["pytest>=7", "pytest-timeout", "openai==3.51.0", "selenium==4.39.0", *DIFFUSERS],
        "gpu": ["flash-attn"],
    },
    entry_points={
        "console_scripts": [
            "stepvideo-tiny=stepvideo.testing.tiny:main",
            "stepvideo-generate=stepvideo.cli.generate:main",
            "stepvideo-eval=stepvideo.cli.evaluate:main",
            "stepvideo-service=stepvideo.cli.service:main",
            "stepvideo-demo=stepvideo.cli.demo:main",
            "stepvideo-decode=stepvideo.decode:main",
        ]
    },
)
