"""pylon-cxr: chest X-ray pneumonia classifiers whose heatmaps are scored, not just shown.

install_requires gives compatible ranges: the lower bound is the version the project is tested
with, the upper bound the next release that may break the APIs it uses (the next minor for torch,
its paired torchvision and for 0.x packages, the next major otherwise). The exact tested set,
dependencies of dependencies included, is in constraints.txt:
`pip install -c constraints.txt -e '.[dev]'` (what `make setup` runs) reproduces it.
"""
from setuptools import find_packages, setup

setup(
    name="pylon-cxr",
    version="0.1.0",
    description="PYLON and baseline CAM classifiers for chest X-ray pneumonia, with localization scoring",
    python_requires=">=3.11",
    packages=find_packages(include=["pylon", "pylon.*"]),
    install_requires=[
        "torch>=2.14.1,<2.15",
        "torchvision>=0.29.1,<0.30",
        "segmentation-models-pytorch>=0.6.0,<0.7",
        "timm>=1.0.31,<2",
        "huggingface-hub>=2.4.0,<3",
        "numpy>=2.4.6,<3",
        "omegaconf>=2.4.0,<3",
        "PyYAML>=6.0.3,<7",
        "pillow>=13.0.0,<14",
        "pydicom>=3.0.2,<4",
        "pylibjpeg>=2.1.0,<3",
        "pylibjpeg-libjpeg>=2.5.0,<3",
        "pylibjpeg-openjpeg>=2.6.0,<3",
        "pylibjpeg-rle>=2.2.0,<3",
        "pyjpegls>=1.5.1,<2",
        "albumentations>=2.0.8,<3",
        "opencv-python-headless>=5.0.0.93,<6",
        "pandas>=3.1.1,<4",
        "scikit-learn>=1.9.1,<2",
        "grad-cam>=1.5.7,<2",
        "matplotlib>=3.11.2,<4",
        "tqdm>=4.70.1,<5",
        "wandb>=0.31.0,<0.32",
        "optuna>=5.0.0,<6",
        "umap-learn>=0.5.12,<0.6",
    ],
    extras_require={
        "dev": [
            "pytest>=9.2.0,<10",
            "pytest-xdist>=3.8.0,<4",
            # Exact: a newer ruff may flag new things, and `make test` fails on any of them.
            "ruff==0.17.6",
        ],
    },
)
