# The trainer image that Vertex AI runs for the containerSpec specs in deploy/.
#
# Build and push (see docs/vertex.md):
#   docker build -t us-central1-docker.pkg.dev/PROJECT/trainer/trainer:latest .
#   docker push us-central1-docker.pkg.dev/PROJECT/trainer/trainer:latest
# With Google's NCCL plugin, for deploy/multi_worker_reduction_server.yaml:
#   docker build --build-arg REDUCTION_SERVER=1 \
#       -t us-central1-docker.pkg.dev/PROJECT/trainer/trainer-rs:latest .
#
# The base image carries the TensorFlow that setup.py pins (TF_VERSION) with
# its CUDA libraries, so pip keeps it and adds only the trainer and its small
# dependencies. tests/test_dockerfile.py keeps the two in step.
FROM tensorflow/tensorflow:2.21.0-gpu

# Reduction Server needs its NCCL plugin in every GPU replica's image.
ARG REDUCTION_SERVER=0
RUN if [ "$REDUCTION_SERVER" = "1" ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends curl gnupg \
      && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
         | gpg --dearmor -o /usr/share/keyrings/cloud.google.gpg \
      && echo "deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt google-fast-socket main" \
         > /etc/apt/sources.list.d/google-fast-socket.list \
      && apt-get update \
      && apt-get install -y --no-install-recommends google-reduction-server \
      && rm -rf /var/lib/apt/lists/*; \
    fi

# The image is the environment: pip installs into the system Python, also
# where a newer base marks it externally managed (PEP 668).
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1

# Only the package's own files; .dockerignore keeps everything else (tests,
# data, job outputs, .git, credentials) out of the build context too.
COPY setup.py /tmp/trainer-src/
COPY trainer /tmp/trainer-src/trainer
RUN pip install "/tmp/trainer-src[hypertune,plots]" && rm -rf /tmp/trainer-src

# Train as an unprivileged user; relative paths (the default --job_dir) and
# Keras's weight cache land in its home.
RUN useradd --create-home trainer
USER trainer
WORKDIR /home/trainer

ENTRYPOINT ["python", "-m", "trainer.task"]
