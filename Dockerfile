# syntax=docker/dockerfile:1
# token-broker container image.
#
#   docker build -t token-broker .
#   docker run --rm -v /etc/token-broker:/etc/token-broker:ro -v token-broker-state:/var/lib/token-broker \
#     -p 127.0.0.1:8443:8443 token-broker
#
# Nothing secret is in the image: the config, the server cert and key, and the Vault credential
# (role_id/secret_id or a token file) are mounted at run time under /etc/token-broker; state and
# the audit log go to the /var/lib/token-broker volume. Secret files must be mode 0600 and owned
# by uid 10001 (the broker refuses to start when group or others can read them).

ARG PYTHON_IMAGE=python:3.12-slim

# --- build: install the broker and its dependencies into a self-contained virtualenv ---------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/token-broker
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY broker ./broker
# Byte-compiled here, so the read-only runtime never needs to write __pycache__.
RUN /opt/token-broker/bin/pip install . \
 && /opt/token-broker/bin/broker --help > /dev/null

# --- runtime: the virtualenv only, run as an unprivileged user -------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="token-broker" \
      org.opencontainers.image.description="mTLS sidecar token broker for CI runners: short-lived, rotated Vault/OpenBao tokens"
ENV PATH=/opt/token-broker/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BROKER_HEALTH_URL=http://127.0.0.1:9090/healthz
RUN groupadd --system --gid 10001 token-broker \
 && useradd --system --uid 10001 --gid token-broker --home-dir /var/lib/token-broker --no-create-home \
            --shell /usr/sbin/nologin token-broker \
 && mkdir -p /etc/token-broker /var/lib/token-broker \
 && chown token-broker:token-broker /var/lib/token-broker \
 && chmod 0700 /var/lib/token-broker
COPY --from=build /opt/token-broker /opt/token-broker
USER 10001:10001
WORKDIR /var/lib/token-broker
VOLUME ["/var/lib/token-broker"]
# 8443: the mTLS API; 9090: the ops listener (/healthz, /readyz, /metrics), plain HTTP.
EXPOSE 8443 9090
# Liveness on the ops port. The slim image has no curl: the standard library does it. Point
# BROKER_HEALTH_URL elsewhere if [ops] listen is not port 9090.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['BROKER_HEALTH_URL'], timeout=4)"]
# SIGTERM: stop accepting, finish in-flight requests (10 s at most), exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["broker"]
CMD ["serve", "--config", "/etc/token-broker/broker.toml"]
