"""Installs the DELF landmark retrieval system; also the --setup_file Dataflow workers receive."""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def requirements(name):
    with open(os.path.join(HERE, name)) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


setup(
    name="delf-retrieval",
    version="0.1.0",
    description="Large-scale landmark image retrieval with attentive deep local features (DELF)",
    python_requires=">=3.11",
    packages=find_packages(include=["delf_retrieval", "delf_retrieval.*", "pipeline", "pipeline.*",
                                    "transforms", "transforms.*"]) + ["models"],
    # The trained models a preset names (delf_retrieval.model.delf.SHIPPED_MODELS_DIR): data installed
    # beside the packages, so workers find them where a checkout has them; and the page pipeline.serve serves.
    package_data={"models": ["*/*.json", "*/*.h5", "*/*.md"], "pipeline": ["static/*.html"]},
    install_requires=requirements("requirements.txt"),
    extras_require={
        "dev": requirements("requirements-dev.txt"),
        # Benchmarks compare against these; the system itself never imports them.
        "bench": ["faiss-cpu==1.15.1", "nmslib==2.1.2", "psutil", "scikit-image==0.26.0", "opencv-python-headless==5.0.0.93"],
    },
)
