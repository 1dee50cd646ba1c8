# One image for the jacrun client, the Dask scheduler and the Dask workers, so versions match.
# docker-compose.yml runs the quickstart on it: a scheduler, two workers and `jacrun submit`.
#   docker compose up --build               (results in the `results` volume, /work/results)
# By hand:
#   docker build -t jacrun .
#   docker network create jacrun
#   docker run --rm --network jacrun --name scheduler -p 127.0.0.1:8786:8786 -p 127.0.0.1:8787:8787 \
#       jacrun dask scheduler --host 0.0.0.0
#   docker run --rm --network jacrun -v jacrun-results:/work/results jacrun dask worker tcp://scheduler:8786
#   docker run --rm --network jacrun -v jacrun-results:/work/results jacrun \
#       jacrun submit configs/quickstart.yaml --scheduler tcp://scheduler:8786 \
#       --set output.store=/work/results/quickstart.zarr
# Workers write the store's chunks themselves: they and the client must see output.store at
# the same path (a shared volume), and any input files too.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /work
COPY pyproject.toml README.md ./
COPY jacrun ./jacrun
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 --user-group jacrun \
    && mkdir -p /work/results \
    && chown 1000:1000 /work/results
COPY configs ./configs

# the scheduler (8786) and its dashboard (8787)
EXPOSE 8786 8787
USER 1000:1000
CMD ["jacrun", "--help"]
