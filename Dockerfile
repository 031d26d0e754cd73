# dedup-relay as a container, typically a sidecar next to the app that sends mail.
#   docker build -t dedup-relay .
#   docker run -v relay-data:/var/lib/dedup-relay \
#       -e RELAY_UPSTREAM__URL=smtp://smtp.provider.example:587 dedup-relay
# Configured by RELAY_<SECTION>__<KEY> environment variables; no file needed (see README,
# "Running in production"). Not built in this project's CI, which has no container engine.

# --- build: the relay's wheel and the wheels it depends on ---------------------------------
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[uvloop]'

# --- run: the wheels only, no source tree, no compiler ------------------------------------
FROM python:3.11-slim
RUN groupadd --system --gid 10025 relay \
    && useradd --system --uid 10025 --gid 10025 --no-create-home \
        --home-dir /var/lib/dedup-relay --shell /usr/sbin/nologin relay
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-index --find-links /tmp/wheels 'dedup-relay[uvloop]' \
    && rm -rf /tmp/wheels \
    && install -d -o 10025 -g 10025 -m 0750 /var/lib/dedup-relay

# The store (spool, claims, audit) and the default Maildir live in the volume. SMTP stays on
# loopback, shared with the app in a pod or with network_mode: "service:app"; the side port
# (probes, metrics) listens on every address so the kubelet and Prometheus can reach it.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RELAY_STORE__PATH=/var/lib/dedup-relay/relay.db \
    RELAY_UPSTREAM__URL=maildir:/var/lib/dedup-relay/maildir \
    RELAY_HTTP__LISTEN=0.0.0.0:9025 \
    RELAY_RUNTIME__LOG_FORMAT=json

WORKDIR /var/lib/dedup-relay
VOLUME ["/var/lib/dedup-relay"]
USER 10025:10025
EXPOSE 2525 9025

HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["dedup-relay", "health"]
STOPSIGNAL SIGTERM
# Exec form: the relay is PID 1's direct command and receives SIGTERM itself.
ENTRYPOINT ["dedup-relay"]
CMD ["serve"]
