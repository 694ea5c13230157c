# syntax=docker/dockerfile:1
# growclip-daemon as a container: CUDA-capable PyTorch runtime by default, CPU-only on request.
#
#   docker build -t growclip-stream .                       # CUDA (PyTorch's runtime image)
#   docker build -t growclip-stream:cpu \
#     --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .   # CPU only, much smaller
#
# The image holds the code and its pinned dependencies only: no dataset, no checkpoint. State
# (checkpoints, the pidfile) lives in the volume /var/lib/growclip; the config defaults to
# configs/kafka.yaml (an external Kafka cluster); mount your own over /etc/growclip/config.yaml
# or pass `--config`. Give `docker stop` / the orchestrator more time than the 10 s default
# (e.g. --stop-timeout 150): on SIGTERM the daemon finishes its step and writes a checkpoint.
# PyTorch's runtime image of the torch release requirements.txt pins (its torch is kept as it is)
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# extra pip index for torch: empty keeps the base image's torch (or PyPI's CUDA build)
ARG TORCH_INDEX_URL=""
# optional dependency groups of the package: s3 = checkpoints and shards on s3:// URLs
ARG EXTRAS="s3"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/growclip

# Dependencies first, in their own layer: it is rebuilt only when the pins change, not the code.
# requirements.txt pins every version; it is used as constraints so that only the runtime
# dependencies of pyproject.toml (and the chosen extras) are installed, not the test tools.
COPY pyproject.toml requirements.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    sed 's/\[[^]]*\]//' requirements.txt > /tmp/constraints.txt \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = [x for x in '${EXTRAS}'.split(',') if x]; print('\n'.join(p['dependencies'] + [d for x in extras for d in p['optional-dependencies'][x]]))" > /tmp/deps.txt \
    && python -m pip install ${TORCH_INDEX_URL:+--extra-index-url "${TORCH_INDEX_URL}"} \
        -c /tmp/constraints.txt -r /tmp/deps.txt

# The package itself (no dependencies left to resolve), then the example configs.
COPY README.md ./
COPY growclip_stream ./growclip_stream
COPY growclip_daemon ./growclip_daemon
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m pip install --no-deps . \
    && useradd --system --no-log-init --create-home --uid 10001 --user-group growclip \
    && install -d -o growclip -g growclip /var/lib/growclip /var/lib/growclip/checkpoints /etc/growclip
COPY configs ./configs
COPY configs/kafka.yaml /etc/growclip/config.yaml

USER 10001:10001
VOLUME ["/var/lib/growclip"]
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status != 200)"]

ENTRYPOINT ["growclip-daemon", "start"]
CMD ["--config", "/etc/growclip/config.yaml"]
