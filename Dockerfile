# twotower image: the API by default (`twotower serve`), and the one-shot jobs (`twotower train | reindex |
# load-features`) with another command; docker-compose.yml runs both. See README.md "Docker and Compose".
#
#   docker build -t twotower .
#
# PyTorch is the CPU build only (the image must never carry CUDA): it is installed first, alone, from
# TORCH_INDEX_URL (default: PyTorch's CPU wheel index; PyPI's Linux torch is the multi-GB CUDA build), and the
# build fails if CUDA got in anyway. Any PEP 503 index holding a CPU wheel works, e.g. a local folder served on
# loopback (scripts/compose-smoke.sh does that with TORCH_WHEELS=<dir>).
#
# Stages: requirements (pyproject's dependency list) -> deps (venv with the dependencies; rebuilt only when that
# list or the torch arguments change) -> build (the project's wheel; rebuilt when the code changes) -> runtime
# (the deps venv + the project wheel, non-root).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# The dependency list of pyproject.toml alone: the install below is cached on this file's content, so editing the
# code or a tool setting in pyproject.toml does not reinstall the dependencies.
FROM ${PYTHON_IMAGE} AS requirements
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt

FROM ${PYTHON_IMAGE} AS deps
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# torch is already installed, so pip keeps it (pyproject's ">=2.13,<2.14" is met) and adds only its pure-Python
# dependencies from PyPI; the check after it fails the build if any CUDA package got in all the same. Then drop
# what only building C++ extensions (torch/include) and PyTorch's own C++ unit tests (torch/test) use.
COPY --from=requirements /tmp/requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt \
 && python -c "import sys, torch, importlib.metadata as md; \
bad = sorted(d.metadata['Name'] for d in md.distributions() if d.metadata['Name'].lower().startswith(('nvidia-', 'triton'))); \
sys.exit(f'CUDA in the image: torch {torch.__version__} cuda={torch.version.cuda}, {bad}' if torch.version.cuda or bad else 0)" \
 && site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && rm -rf /tmp/requirements.txt "$site/torch/include" "$site/torch/test"

FROM deps AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY training ./training
COPY service ./service
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TWOTOWER_ARTIFACTS=/var/lib/twotower/artifacts \
    TWOTOWER_DATA_DIR=/var/lib/twotower/data
# A fixed uid/gid so volume ownership is predictable; the home is the state directory (artifacts + the embedded
# Redis's data when no TWOTOWER_REDIS_URL is set). The venv stays root-owned: the service cannot modify its code.
RUN groupadd --gid 10001 twotower \
 && useradd --uid 10001 --gid twotower --home-dir /var/lib/twotower --no-create-home \
      --shell /usr/sbin/nologin twotower \
 && mkdir -p /var/lib/twotower/artifacts /var/lib/twotower/data \
 && chown -R twotower:twotower /var/lib/twotower
COPY --from=deps /opt/venv /opt/venv
# A plain COPY of the (small) wheel, not `RUN --mount=from=build`: every builder keys the cache on the copied
# content (buildah 1.28 ignores a mounted stage's content and would keep installing the previous code).
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --disable-pip-version-check --no-deps --no-index /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels \
 && twotower --help >/dev/null
USER 10001:10001
# Relative defaults (`twotower train --artifacts artifacts`, `--data-dir data`) resolve to the same state directory.
WORKDIR /var/lib/twotower
VOLUME ["/var/lib/twotower/artifacts"]
EXPOSE 8000
# Liveness only (the process answers); readiness (a model/index pair is loaded) is /readyz, 503 until then.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["twotower", "serve", "--host", "0.0.0.0", "--port", "8000"]
