# One image for the jacrun client, the Dask scheduler and the Dask workers, so versions match:
#   docker build -t jacrun .
#   docker run --rm -p 8786:8786 -p 8787:8787 jacrun dask scheduler
#   docker run --rm jacrun dask worker tcp://scheduler:8786
#   docker run --rm -v "$PWD/results:/work/results" jacrun jacrun submit configs/quickstart.yaml --scheduler tcp://scheduler:8786
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /work
COPY pyproject.toml README.md ./
COPY jacrun ./jacrun
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 jacrun \
    && mkdir -p /work/results \
    && chown jacrun /work/results
COPY configs ./configs

USER jacrun
EXPOSE 8786 8787
CMD ["jacrun", "--help"]
