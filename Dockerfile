# tap-receiver: destination for live call-audio taps (WebSocket and RTP) -> WAV + JSON sidecar.
#
#   docker build -t tap-receiver .
#   docker run -d --name tap-receiver -p 8080:8080/tcp -p 5004:5004/udp \
#       -v tap-recordings:/recordings tap-receiver
#
# Configured with RECEIVER_* environment variables (or flags after the image name). `docker stop`
# sends SIGTERM straight to the server (exec-form entry point), which finalizes every open
# recording within shutdown_timeout (default 4 s, below docker's 10 s grace period).

# --- build: a virtual environment with the package and its dependencies -----------------------
FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/tap-receiver
WORKDIR /src
# Build requirements and dependencies first, read from pyproject.toml itself: a code change
# reuses this layer, and the package then builds without a fresh isolated build environment.
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); print(*p["build-system"]["requires"], *p["project"]["dependencies"], sep="\n")' \
        > /tmp/requirements.txt \
    && /opt/tap-receiver/bin/pip install -r /tmp/requirements.txt
# Then the package itself (.dockerignore lets only pyproject.toml, README.md and receiver/ in).
# Build tools and pip leave the environment; `pip check` proves nothing needed them.
COPY . ./
RUN /opt/tap-receiver/bin/pip install --no-deps --no-build-isolation . \
    && /opt/tap-receiver/bin/pip uninstall --yes setuptools \
    && /opt/tap-receiver/bin/pip check \
    && /opt/tap-receiver/bin/pip uninstall --yes pip

# --- final: the base image plus that environment, run as an unprivileged user -----------------
FROM python:3.12-slim
LABEL org.opencontainers.image.title="tap-receiver" \
      org.opencontainers.image.description="Destination for live call-audio taps (WebSocket and RTP): WAV + JSON sidecar per tap" \
      org.opencontainers.image.licenses="MIT"
ARG UID=10001
# libopus: the Opus decoder (opuslib-next loads the system's library)
RUN apt-get update && apt-get install -y --no-install-recommends libopus0 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid "${UID}" receiver \
    && useradd --no-log-init --uid "${UID}" --gid "${UID}" --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin receiver \
    && mkdir /recordings \
    && chown "${UID}:${UID}" /recordings
COPY --from=build /opt/tap-receiver /opt/tap-receiver
ENV PATH=/opt/tap-receiver/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RECEIVER_RECORDINGS=/recordings
USER ${UID}:${UID}
VOLUME ["/recordings"]
EXPOSE 8080/tcp 5004/udp
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "-m", "receiver.server.healthcheck"]
ENTRYPOINT ["tap-receiver"]
