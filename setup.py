from setuptools import find_packages, setup

setup(
    name="crm_d2",
    version="0.1.0",
    description="Continuous Refinement Model (CRM, CVPR 2022): fast high-resolution mask refinement "
    "and a Detectron2 post-refinement extension",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["crm_d2", "crm_d2.*"]),
    package_data={"crm_d2": ["assets/*", "assets/**/*"]},
    include_package_data=True,
    # Lower bounds: the oldest releases the whole test suite was run with (torch 2.4.1, numpy 1.26.4,
    # opencv-python-headless 4.8.1.78, pycocotools 2.0.7, tqdm 4.62.3, PyYAML 6.0.1, pytest 8.0.0), as CI runs
    # today's newest. No upper bounds: no release is known to break crm_d2.
    install_requires=[
        "torch>=2.4",
        "numpy>=1.26",
        "opencv-python-headless>=4.8",
        "pycocotools>=2.0.7",
        "tqdm>=4.62",
        "PyYAML>=6.0",
    ],
    extras_require={
        "test": ["pytest>=8.0"],
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["crm-d2=crm_d2.cli:main"]},
)
