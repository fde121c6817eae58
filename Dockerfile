# Production image of the image-generation service: `image-generation-server` (Hayhooks' app plus our HTTP guard)
# serving pipelines/ as `image_generation`. Built with BuildKit (the default of `docker compose` and Docker 23+).
#   docker build -t hayhooks-image-generation .                                          # Hugging Face API backend
#   docker build --build-arg BACKEND=local -t hayhooks-image-generation:local .          # + diffusers/torch backend
#   docker build --build-arg EXTRAS=c2pa -t hayhooks-image-generation .                  # + C2PA signing
# The local backend takes torch from, in order of preference: a wheel put in wheels/ (git-ignored), the index given
# by the TORCH_INDEX_URL build argument (e.g. PyTorch's CPU index, for a small CPU-only image), then PyPI (on Linux,
# the CUDA build).
# No secrets are baked in: HF_TOKEN and the IMAGE_GENERATION_* settings come from the environment at run time.
# Layers go from the least to the most often changed: base, pinned dependencies, torch, our code, pipelines.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# huggingface_api, or local (adds the `local` extra: torch, diffusers, transformers, accelerate).
ARG BACKEND=huggingface_api

# ---- requirements: the pinned requirement lists from pyproject.toml (base.txt, <extra>.txt). The stages below
# copy only these lists, so an edit elsewhere in pyproject.toml keeps their layers cached ----
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
COPY scripts/requirements.py ./scripts/
RUN python scripts/requirements.py --write /req

# ---- deps-huggingface_api: the pinned dependencies in /opt/venv, a venv with no pip of its own ----
FROM ${PYTHON_IMAGE} AS deps-huggingface_api
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv --without-pip /opt/venv
COPY --from=requirements /req/base.txt /req/
RUN --mount=type=cache,id=pip-cache,target=/root/.cache/pip \
    pip --python /opt/venv/bin/python install --requirement /req/base.txt

# ---- deps-local: plus the `local` extra; torch from wheels/, TORCH_INDEX_URL or PyPI ----
FROM deps-huggingface_api AS deps-local
ARG TORCH_INDEX_URL=""
COPY --from=requirements /req/local.txt /req/
RUN --mount=type=cache,id=pip-cache,target=/root/.cache/pip \
    --mount=type=bind,source=wheels,target=/wheels \
    pip --python /opt/venv/bin/python install --requirement /req/local.txt --find-links /wheels \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}

# ---- deps: the backend's dependencies plus optional extras (EXTRAS, comma-separated, e.g. c2pa) ----
FROM deps-${BACKEND} AS deps
ARG EXTRAS=""
RUN --mount=type=cache,id=pip-cache,target=/root/.cache/pip \
    --mount=type=bind,from=requirements,source=/req,target=/req \
    if [ -n "$EXTRAS" ]; then \
      for extra in $(echo "$EXTRAS" | tr , ' '); do cat "/req/$extra.txt"; done > /tmp/extras.txt \
      && pip --python /opt/venv/bin/python install --requirement /tmp/extras.txt; \
    fi

# ---- wheel: our packages (components, image_generation_server), the only layer a code change rebuilds ----
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY components ./components
COPY image_generation_server ./image_generation_server
RUN --mount=type=cache,id=pip-cache,target=/root/.cache/pip \
    pip wheel --disable-pip-version-check --no-deps --wheel-dir /dist .

# ---- runtime: the venv, our wheel installed, the pipelines; no compiler, no pip, no tests ----
FROM ${PYTHON_IMAGE} AS runtime
# HAYHOOKS_DURABLE_MODE fixes the pipeline set at startup: without it hayhooks serves unauthenticated
# POST /deploy_files, /deploy-yaml and /undeploy/{name}, i.e. anyone who reaches the port could run code in the
# container or take the pipeline down. It also turns jobs on (in memory; docker-compose.yml puts them in Redis).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HAYHOOKS_HOST=0.0.0.0 \
    HAYHOOKS_PORT=1416 \
    HAYHOOKS_PIPELINES_DIR=/opt/pipelines \
    HAYHOOKS_DURABLE_MODE=true \
    HAYSTACK_TELEMETRY_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HOME=/var/cache/huggingface \
    XDG_CACHE_HOME=/tmp/.cache
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
 && mkdir -p /var/cache/huggingface /var/lib/image-generation/images \
 && chown app:app /var/cache/huggingface /var/lib/image-generation/images
COPY --from=deps /opt/venv /opt/venv
# Our wheel goes in with the base image's own pip (/usr/local/bin/python's), which then goes too: nothing in the
# container can install packages.
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    /usr/local/bin/python -m pip --python /opt/venv/bin/python install --quiet --disable-pip-version-check \
        --root-user-action=ignore --no-deps --no-index /dist/*.whl \
 && /usr/local/bin/python -m pip uninstall --yes --quiet --disable-pip-version-check --root-user-action=ignore \
        pip setuptools wheel
# Baked in so the image runs on its own; docker-compose.yml mounts ./pipelines over it read-only. The JSON variants
# (wrapper folders sharing those pipelines) and the editing wrapper are deployed beside it.
COPY pipelines /opt/pipelines/image_generation
COPY pipelines/image_editing /opt/pipelines/image_editing
COPY served/image_generation_json /opt/pipelines/image_generation_json
COPY served/image_editing_json /opt/pipelines/image_editing_json
USER 10001:10001
WORKDIR /home/app
EXPOSE 1416
# Healthy only when GET /ready answers 200: the pipeline is deployed and warmed up, and its upstream (or local model)
# can be reached. It sends nothing upstream, so it costs nothing.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('HAYHOOKS_PORT', '1416'), timeout=4)"]
ENTRYPOINT ["image-generation-server"]
