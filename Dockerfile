# syntax=docker/dockerfile:1
# Production image of the image-generation service: `image-generation-server` (Hayhooks' app plus our HTTP guard)
# serving pipelines/ as `image_generation`.
#   docker build -t hayhooks-image-generation .                        # Hugging Face API backend
#   docker build --build-arg EXTRAS=local -t hayhooks-image-generation:local .   # + diffusers/torch backend
# No secrets are baked in: HF_TOKEN and the IMAGE_GENERATION_* settings come from the environment at run time.
# tests/test_compose.py runs the ENTRYPOINT, ENV and HEALTHCHECK below without Docker: keep them in sync with
# docker-compose.yml.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: resolve and install the pinned dependencies and the `components` package into /opt/venv ----
FROM ${PYTHON_IMAGE} AS builder
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# A venv without pip: the base image's pip installs into it, so no installer is left in what we ship.
RUN python -m venv --without-pip /opt/venv
WORKDIR /src
# Dependencies first (pinned in pyproject.toml), in their own layer: editing the code does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e for e in os.environ.get('EXTRAS', '').split(',') if e]; \
print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" > requirements.txt \
 && pip --python /opt/venv/bin/python install --requirement requirements.txt
COPY README.md ./
COPY components ./components
COPY server ./server
RUN pip --python /opt/venv/bin/python install --no-deps .

# ---- runtime: the venv and the service files only; no compilers, no pip cache, no tests ----
FROM ${PYTHON_IMAGE} AS runtime
# HAYHOOKS_DURABLE_MODE fixes the pipeline set at startup: without it hayhooks serves unauthenticated
# POST /deploy_files, /deploy-yaml and /undeploy/{name}, i.e. anyone who reaches the port could run code in the
# container or take the pipeline down. No durable wrapper is deployed, so the in-memory store holds nothing.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HAYHOOKS_HOST=0.0.0.0 \
    HAYHOOKS_PORT=1416 \
    HAYHOOKS_PIPELINES_DIR=/opt/pipelines \
    HAYHOOKS_DURABLE_MODE=true \
    HAYHOOKS_DURABLE_STORE=memory \
    HAYSTACK_TELEMETRY_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HOME=/var/cache/huggingface \
    XDG_CACHE_HOME=/tmp/.cache
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
 && mkdir -p /var/cache/huggingface /var/lib/image-generation/images \
 && chown app:app /var/cache/huggingface /var/lib/image-generation/images
COPY --from=builder /opt/venv /opt/venv
# Baked in so the image runs on its own; docker-compose.yml mounts ./pipelines over it read-only.
COPY pipelines /opt/pipelines/image_generation
USER 10001:10001
WORKDIR /home/app
EXPOSE 1416
# Healthy only when /status lists the image_generation pipeline (hayhooks serves without it if setup() failed).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import json, os, sys, urllib.request as u; s = json.load(u.urlopen('http://127.0.0.1:%s/status' % os.environ.get('HAYHOOKS_PORT', '1416'), timeout=4)); sys.exit(0 if 'image_generation' in s.get('pipelines', []) else 1)"]
ENTRYPOINT ["image-generation-server"]
