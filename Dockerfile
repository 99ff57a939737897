# CUDA image that runs the imgembed Snakemake workflow.
#
# Build:
#   docker build -t imgembed .
# Run the whole workflow on all GPUs as yourself, keeping inputs and results on
# the host (folders made first, so that they are yours and not the daemon's root's):
#   mkdir -p data reports
#   docker run --rm --gpus all --ipc=host --user "$(id -u):$(id -g)" \
#     -v "$PWD/data:/workspace/data" -v "$PWD/reports:/workspace/reports" imgembed
# Arguments after the image name go to snakemake, e.g. a dry run or one target:
#   docker run --rm imgembed -n
#   docker run --rm --gpus all --ipc=host -v "$PWD/data:/workspace/data" imgembed --cores 4 train
# Check the GPUs, versions and precision first:  docker run --rm --gpus all imgembed doctor
# Mount models/, embeddings/ and logs/ the same way to keep those too, and
# /var/cache/imgembed to keep downloaded pretrained weights between runs.
# A shell instead of snakemake:  docker run --rm -it --entrypoint bash imgembed
# Without --user the container runs as uid 1000; the work folders and caches
# accept any uid, and the entrypoint stops at once, naming the folder, when a
# mounted one is not writable.
#
# The base is an official PyTorch CUDA + cuDNN runtime image, pinned by tag (pin
# a digest too, pytorch/pytorch:TAG@sha256:..., for byte-for-byte rebuilds). Any
# base works that has Python with pip on PATH and torch/torchvision installed:
# the project is installed around the base's torch, never over it.
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# The runtime user's ids (match a host user's to share mounted folders).
ARG APP_UID=1000
ARG APP_GID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Caches live in one folder that any uid may write (see --user above):
# Hugging Face/timm weights, torch hub, matplotlib, pip and accelerate state.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    MPLBACKEND=Agg \
    XDG_CACHE_HOME=/var/cache/imgembed \
    HF_HOME=/var/cache/imgembed/huggingface \
    TORCH_HOME=/var/cache/imgembed/torch \
    MPLCONFIGDIR=/var/cache/imgembed/matplotlib

# Some bases already have a user or group with these ids (Ubuntu 24.04's
# `ubuntu`, uid 1000): that one is removed first.
RUN if getent passwd "${APP_UID}" > /dev/null; then userdel --remove "$(getent passwd "${APP_UID}" | cut -d: -f1)"; fi \
 && if getent group "${APP_GID}" > /dev/null; then groupdel "$(getent group "${APP_GID}" | cut -d: -f1)"; fi \
 && groupadd --gid "${APP_GID}" imgembed \
 && useradd --no-log-init --uid "${APP_UID}" --gid "${APP_GID}" --create-home --shell /bin/bash imgembed \
 && mkdir -p "${HF_HOME}" "${TORCH_HOME}" "${MPLCONFIGDIR}" \
 && chown -R imgembed:imgembed "${XDG_CACHE_HOME}" \
 && chmod -R 1777 "${XDG_CACHE_HOME}"

WORKDIR /workspace

# Keep the base image's torch and torchvision: pin the installed versions as pip
# constraints, so a dependency that wants another torch fails the build instead
# of silently replacing the CUDA build with a download from PyPI.
RUN python -m pip list --format=freeze | grep -iE '^(torch|torchvision)==' > /etc/pip-torch-constraints.txt \
 && test "$(wc -l < /etc/pip-torch-constraints.txt)" -eq 2 \
 && cat /etc/pip-torch-constraints.txt
ENV PIP_CONSTRAINT=/etc/pip-torch-constraints.txt

# Dependencies first, read from pyproject.toml alone, so that editing the code
# or the workflow does not reinstall them. The `workflow` extra brings snakemake
# and dvc. Their versions are pinned by requirements.lock (made by .ci/lock with
# pip-tools, the same pins CI uses); torch and its CUDA wheels are not in it.
COPY pyproject.toml requirements.lock ./
# (tomllib is Python >= 3.11; on 3.10 pip's own copy of tomli reads the file.)
RUN python -c 'import importlib, sys; toml = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "pip._vendor.tomli"); p = toml.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["workflow"]))' > /tmp/requirements.txt \
 && python -m pip install --no-cache-dir -c requirements.lock -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The package itself, not editable. (src/ stays in the image all the same: the
# Snakefile validates the config against src/imgembed/schemas/.)
COPY README.md ./
COPY src/ ./src/
RUN python -m pip install --no-cache-dir --no-deps . \
 && rm -rf build ./*.egg-info src/*.egg-info \
 && python -m pip list --format=freeze | grep -iE '^(torch|torchvision)==' | diff - /etc/pip-torch-constraints.txt \
 && python -c "import imgembed, torch, torchvision, timm, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && snakemake --version

# The workflow, with its default profile (profiles/default, which snakemake
# loads by itself). Outputs are written below /workspace: the folders exist already
# and are writable by the runtime user (and by any --user uid).
COPY Snakefile dvc.yaml ./
COPY config/ ./config/
COPY workflow/ ./workflow/
COPY envs/ ./envs/
COPY profiles/ ./profiles/
COPY docker/entrypoint.sh /usr/local/bin/imgembed-entrypoint
RUN chmod 0755 /usr/local/bin/imgembed-entrypoint \
 && mkdir -p data models embeddings reports logs .snakemake \
 && chown imgembed:imgembed . data models embeddings reports logs .snakemake \
 && chmod 1777 . data models embeddings reports logs .snakemake

# Numeric, so that runtimes can tell it is not root (Kubernetes runAsNonRoot).
USER ${APP_UID}:${APP_GID}

# Labels last, so that a new REVISION or CREATED does not invalidate the cached
# layers above (docker build --build-arg REVISION="$(git rev-parse HEAD)" ...).
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="imgembed" \
      org.opencontainers.image.description="Snakemake workflow that trains image-embedding models (PyTorch, timm, accelerate)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# The entrypoint runs `snakemake "$@"` and adds `--cores all` unless the
# arguments already set --cores/-c or --jobs/-j, so `docker run IMAGE -n` or
# `docker run IMAGE train` still uses every core while `--cores 4` is obeyed.
# (A plain ENTRYPOINT ["snakemake"] + CMD ["--cores","all"] would drop
# `--cores all` as soon as any argument is given, and snakemake then refuses to
# run without --cores.)
ENTRYPOINT ["/usr/local/bin/imgembed-entrypoint"]
CMD []
