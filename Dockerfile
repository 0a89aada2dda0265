# walcast as a container: `docker compose up` (compose.yaml) builds this image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY cdc ./cdc
COPY gateway ./gateway
COPY migrations ./migrations
COPY walcast ./walcast
# gcc only to build cdc._speedups (the decoder's tuple loop in C), removed in the same layer.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install . \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/* \
    && (cd / && python -c "import cdc._speedups") \
    && useradd --system --uid 10001 --no-create-home walcast

USER walcast
WORKDIR /
# Inside a container, listen on every interface (the default, 127.0.0.1, is unreachable).
ENV WALCAST_HOST=0.0.0.0 \
    WALCAST_PORT=4000
EXPOSE 4000

# 200 once replication is streaming; urlopen raises on 503.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('WALCAST_PORT', '4000'), timeout=2)"

# Exec form: walcast is PID 1 and receives SIGTERM itself (graceful shutdown, sockets get 1001).
CMD ["walcast", "serve"]
