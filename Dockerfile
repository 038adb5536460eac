# pgmeter image: one image, every role is a subcommand
#   docker run IMAGE                      -> pgmeter api
#   docker run IMAGE --config F sink      -> pgmeter --config F sink
# Runtime dependencies only (`pip install .`, never the `dev` extra: the
# embedded Postgres/NATS/Valkey servers are for laptops and tests).

# --- build: install the package into a virtualenv ---------------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/pgmeter
WORKDIR /src
# README.md is the package's readme (pyproject `readme`); sql/ ships inside
# the wheel as pgmeter.sql.
COPY pyproject.toml README.md ./
COPY src ./src
COPY sql ./sql
RUN /opt/pgmeter/bin/pip install .

# --- runtime -----------------------------------------------------------------
FROM python:3.11-slim
LABEL org.opencontainers.image.title="pgmeter" \
      org.opencontainers.image.description="OpenMeter-compatible usage metering on PostgreSQL, NATS JetStream and Valkey" \
      org.opencontainers.image.licenses="Apache-2.0"
# Fixed non-root uid/gid 10001, matching the chart's securityContext.
RUN groupadd --system --gid 10001 pgmeter \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin pgmeter
COPY --from=build /opt/pgmeter /opt/pgmeter
# The chart mounts the root filesystem read-only with an emptyDir on /tmp:
# no .pyc writes, unbuffered JSON logs to stdout, HOME under /tmp.
ENV PATH=/opt/pgmeter/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    PGMETER_ADDRESS=0.0.0.0:8888
WORKDIR /tmp
USER 10001:10001
EXPOSE 8888
ENTRYPOINT ["pgmeter"]
CMD ["api"]
