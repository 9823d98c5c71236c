# poe-serve on Ray's image: the same image for the head and the worker pods (KubeRay), or alone.
#
#   docker build -t poe-serve .                                   # CUDA torch from PyPI
#   docker build -t poe-serve:cpu --build-arg BASE=rayproject/ray:2.60.0-py312 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   docker run --rm -p 50051:50051 -p 8000:8000 --shm-size=4g poe-serve
#
# The Ray version must match the cluster's (rayVersion in cluster_configs/kuberay-*.yaml). Ray's
# images carry no torch: `pip install .` takes PyPI's Linux wheel, which is built for CUDA; for a
# CPU-only image, TORCH_INDEX_URL installs torch from that index first. The embedded default
# model is in the package; mount a checkpoint and pass --checkpoint for another.
ARG BASE=rayproject/ray:2.60.0-py312-gpu
FROM ${BASE}

ARG TORCH_INDEX_URL=
WORKDIR /home/ray/poe-serve
COPY --chown=ray:users . .
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --no-cache-dir torch --index-url "$TORCH_INDEX_URL"; fi \
    && pip install --no-cache-dir .

# gRPC, then the OpenAI-compatible HTTP API (/health, /ready, /metrics)
EXPOSE 50051 8000
# liveness: fails only when the engine loop died (/ready also fails while a stage is down)
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD wget -q -T 4 -O /dev/null http://127.0.0.1:8000/health || exit 1
# exec form: SIGTERM reaches the server itself, which drains for up to --shutdown-timeout;
# `docker stop` waits 10 s by default: give it `-t 40`
ENTRYPOINT ["poe-serve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "50051", "--http-port", "8000", "--shutdown-timeout", "30"]
