# One image for every role of the distributed mode: `speech2image serve` (the API, the default
# command) and `speech2image worker`. compose.yaml runs it as `speech2image cluster` does.
# Not built on the project's machines (no registry to pull the base image from): tests only
# check that the files and commands it names exist (tests/test_cluster.py).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HOST=0.0.0.0 \
    PORT=5000 \
    S2I_HEALTH_PORT=0 \
    S2I_MODEL_CACHE_DIR=/models \
    S2I_LOG_DIR=/var/log/speech2image \
    S2I_UPLOAD_DIR=/tmp/speech2image-uploads

WORKDIR /app
# requirements.txt pins every package: dependencies first, so code changes reuse this layer.
COPY requirements.txt ./
RUN pip install -r requirements.txt
COPY pyproject.toml README.md ./
COPY speech2image ./speech2image
RUN pip install --no-deps . \
    && useradd --create-home --uid 1000 s2i \
    && mkdir -p /models /var/log/speech2image \
    && chown s2i /models /var/log/speech2image

USER s2i
EXPOSE 5000
CMD ["speech2image", "serve"]
