# Worker container for Dataflow GPU jobs (run_dataflow.sh passes it as --sdk_container_image).
# The Beam SDK image of the pinned Beam version and Python, plus CUDA TensorFlow of the pinned
# TensorFlow version (its CUDA/cuDNN libraries come as pip wheels; Dataflow installs the NVIDIA
# driver on the host with worker_accelerator=...;install-nvidia-driver).
#
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/delf-worker:TAG .
#   docker push REGION-docker.pkg.dev/PROJECT/REPO/delf-worker:TAG
FROM apache/beam_python3.11_sdk:2.77.0

WORKDIR /opt/delf
COPY requirements.txt setup.py MANIFEST.in README.md ./
# tensorflow-cpu in requirements.txt is swapped for the CUDA build of the same version.
RUN sed 's/^tensorflow-cpu==/tensorflow[and-cuda]==/' requirements.txt > requirements-gpu.txt \
 && pip install --no-cache-dir -r requirements-gpu.txt
# setup.py also reads the test requirements (its dev extra): copied after the heavy layer above.
COPY requirements-dev.txt ./
COPY delf_retrieval ./delf_retrieval
COPY pipeline ./pipeline
COPY transforms ./transforms
COPY models ./models
RUN pip install --no-cache-dir --no-deps .
# Keras weights converted on first use are cached here (one conversion per worker).
ENV DELF_CACHE_DIR=/tmp/delf-cache

ENTRYPOINT ["/opt/apache/beam/boot"]
