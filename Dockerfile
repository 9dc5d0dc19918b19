# syntax=docker/dockerfile:1
#
# smtp-bridge as a container (a sidecar next to the application that sends mail).
#
#   docker build -t smtp-bridge .
#   docker run -d --name smtp-bridge \
#     -v "$PWD/bridge.yaml:/etc/smtp-bridge/bridge.yaml:ro" \
#     -v smtp-bridge-spool:/var/lib/smtp-bridge \
#     -e SENDGRID_API_KEY -p 127.0.0.1:2525:2525 --stop-timeout 45 smtp-bridge
#
# The config must listen on 0.0.0.0 (with listen.allow_networks or auth.users) and keep
# the spool on the volume: spool.path: /var/lib/smtp-bridge/spool.sqlite3. README.md,
# section "Docker", has the details; docker-compose.example.yml a complete setup.

# --- builder: install the package and its dependencies into a virtual environment ---------
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/smtp-bridge
WORKDIR /src
# pyproject.toml names README.md as the package's readme, so the build needs it.
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN /opt/smtp-bridge/bin/pip install . \
 && /opt/smtp-bridge/bin/smtp-bridge --version

# --- runtime: the venv only, run as an unprivileged user --------------------------------------
FROM python:3.11-slim

# A fixed uid/gid, so a bind-mounted spool directory can be chowned to it (10025:10025).
RUN groupadd --system --gid 10025 smtp-bridge \
 && useradd --system --uid 10025 --gid smtp-bridge --no-create-home \
      --home-dir /var/lib/smtp-bridge --shell /usr/sbin/nologin smtp-bridge \
 && install -d -o smtp-bridge -g smtp-bridge -m 0700 /var/lib/smtp-bridge \
 && install -d -m 0755 /etc/smtp-bridge

COPY --from=builder /opt/smtp-bridge /opt/smtp-bridge

# SMTP_BRIDGE_CONFIG is the default --config of every subcommand, so
# `docker exec smtp-bridge smtp-bridge queue list` needs no flags.
ENV PATH=/opt/smtp-bridge/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SMTP_BRIDGE_CONFIG=/etc/smtp-bridge/bridge.yaml

USER smtp-bridge
WORKDIR /var/lib/smtp-bridge
# The spool (SQLite database and its WAL). Mail accepted with 250 lives here until it
# is delivered: keep it on a volume that survives the container.
VOLUME ["/var/lib/smtp-bridge"]
EXPOSE 2525

# SIGTERM drains: stop accepting, finish attempts in flight (delivery.shutdown_grace,
# 30s by default), exit 0. Give `docker stop` more than that: --stop-timeout 45 /
# compose stop_grace_period: 45s. SIGHUP re-reads the TLS certificate.
STOPSIGNAL SIGTERM

# `smtp-bridge health` asks /readyz on health.host:health.port (default 127.0.0.1:9025),
# which inside the container is the container's own loopback: it needs no published port.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
  CMD ["smtp-bridge", "health", "--config", "/etc/smtp-bridge/bridge.yaml"]

ENTRYPOINT ["smtp-bridge"]
CMD ["serve", "--config", "/etc/smtp-bridge/bridge.yaml"]
