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
    install_requires=[
        "torch>=2.0",
        "numpy",
        "opencv-python-headless",
        "pycocotools",
        "tqdm",
        "PyYAML",
    ],
    extras_require={
        "test": ["pytest"],
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["crm-d2=crm_d2.cli:main"]},
)
