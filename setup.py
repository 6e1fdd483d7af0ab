from setuptools import find_packages, setup

setup(
    name="distopt",
    version="0.1.0",
    description="Sharded ML-FOP-SOAP: SOAP + Fisher-Orthogonal Projection with hierarchical micro-step folding",
    packages=find_packages(include=["distopt", "distopt.*", "model_zoo", "model_zoo.*", "launcher", "launcher.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "pyyaml"],
    extras_require={"deepspeed": ["deepspeed==0.19.8"]},
)
