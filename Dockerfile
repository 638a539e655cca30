# Magi Gateway image. The default command runs the gateway (`magi-gateway serve`, port 8000);
# agent workers run the same image with `magi-gateway agent ...` (see docs/DEPLOY.md).
#   docker build -t magi-gateway:0.1.0 .

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps everything else out of the context).
COPY pyproject.toml README.md constraints.txt ./
COPY src ./src
# Wheels of the project and of every dependency, so the runtime stage needs no compiler.
RUN pip wheel --wheel-dir /wheels -c constraints.txt .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels magi-gateway \
    && groupadd --system --gid 10001 magi \
    && useradd --system --uid 10001 --gid magi --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin magi
WORKDIR /app
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 8000
# The gateway closes its WebSockets with 1012 on SIGTERM, then drains (about 7 s at most).
STOPSIGNAL SIGTERM
CMD ["magi-gateway", "serve"]
