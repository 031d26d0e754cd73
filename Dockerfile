# dedup-relay as a container, typically a sidecar next to the app that sends mail.
#   docker build -t dedup-relay .
#   docker run -v relay-data:/app/data -v $PWD/relay.yaml:/app/config/relay.yaml:ro dedup-relay
FROM python:3.11-slim

RUN useradd --system --create-home --home-dir /app relay
WORKDIR /app

COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip install --no-cache-dir . && rm -rf relay pyproject.toml

COPY config/relay.yaml ./config/relay.yaml
RUN mkdir -p /app/data && chown relay:relay /app/data
USER relay
VOLUME ["/app/data"]
EXPOSE 2525

# The store, the Maildir upstream and all relative paths live under /app/data.
HEALTHCHECK --interval=30s --timeout=3s \
    CMD python -c "import socket; socket.create_connection(('127.0.0.1', 2525), 2).close()"
STOPSIGNAL SIGTERM
CMD ["python", "-m", "relay", "serve", "--config", "/app/config/relay.yaml"]
