# A Linux CPU runner image: the mlx-verify engine and CLI with mlx[cpu], mlx-lm,
# transformers and torch. `docker run IMAGE check llama` runs the main job.
# (The server and report worker have their own image: deploy/Dockerfile.)
# As a runner (`worker --queue verify`) it sandboxes PR code with bubblewrap, which needs
# user namespaces and a fresh /proc inside the container: run it with
# --security-opt seccomp=unconfined --security-opt apparmor=unconfined
# --security-opt systempaths=unconfined (docs/deploy.md); without them it refuses to start.
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends git libopenblas0-serial \
    bubblewrap && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home verify
WORKDIR /opt/mlx-verify
COPY pyproject.toml README.md ./
COPY constraints ./constraints
COPY mlx_verify ./mlx_verify
COPY checks ./checks
COPY app ./app
COPY workers ./workers
RUN pip install --no-cache-dir -c constraints/lock.txt .
USER verify
ENV MLX_VERIFY_CACHE=/home/verify/.cache/mlx-verify HF_HUB_OFFLINE=1 \
    MLX_VERIFY_LOCK_DIR=/opt/mlx-verify/constraints
ENTRYPOINT ["mlx-verify"]
CMD ["check", "llama"]
