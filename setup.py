"""pylon-cxr: chest X-ray pneumonia classifiers whose heatmaps are scored, not just shown."""
from setuptools import find_packages, setup

setup(
    name="pylon-cxr",
    version="0.1.0",
    description="PYLON and baseline CAM classifiers for chest X-ray pneumonia, with localization scoring",
    python_requires=">=3.10",
    packages=find_packages(include=["pylon", "pylon.*"]),
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "segmentation-models-pytorch==0.6.0",
        "timm==1.0.31",
        "huggingface-hub==2.4.0",
        "numpy==2.4.6",
        "omegaconf==2.4.0",
        "PyYAML==6.0.3",
        "pillow==13.0.0",
        "pydicom==3.0.2",
        "pylibjpeg==2.1.0",
        "pylibjpeg-libjpeg==2.5.0",
        "pylibjpeg-openjpeg==2.6.0",
        "pylibjpeg-rle==2.2.0",
        "pyjpegls==1.5.1",
        "albumentations==2.0.8",
        "opencv-python-headless==5.0.0.93",
        "pandas==3.1.1",
        "scikit-learn==1.9.1",
        "grad-cam==1.5.7",
        "matplotlib==3.11.2",
        "tqdm==4.70.1",
        "wandb==0.31.0",
        "optuna==5.0.0",
        "umap-learn==0.5.12",
    ],
    extras_require={
        "dev": [
            "pytest==9.2.0",
            "pytest-xdist==3.8.0",
        ],
    },
)
