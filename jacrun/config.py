"""Job configs: pydantic models of design section 2 and the only YAML reader.

Every problem found while loading becomes one :class:`ConfigError` whose lines read
``job.yaml:12: chunks.samples: Input should be greater than 0``: the file, the YAML line,
the dotted key and the message. YAML is parsed with the safe loader only (no tags are ever
constructed) and duplicate keys are refused.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Discriminator,
    Field,
    NonNegativeInt,
    PositiveInt,
    PrivateAttr,
    SerializeAsAny,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from jacrun.errors import ConfigError
from jacrun.functions import FunctionSpec, kinds, parse_spec
from jacrun.paths import InputLocation, InputPath, OutputLocation
from jacrun.reduce import Reduction

Dtype = Literal["float32", "float64"]
Loc = tuple[Any, ...]
_KEY_PREFIX = re.compile(r"([A-Za-z_]\w*(?:\.\w+)*): ")


class Strict(BaseModel):
    """Base of every config section: unknown keys and NaN/Inf numbers are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


# ---- inputs ----------------------------------------------------------------------------------


class RandomInputs(Strict):
    """X drawn from a counter-based generator: a pure function of (seed, sample index)."""

    kind: Literal["random"]
    samples: PositiveInt = Field(description="N, the number of rows of X")
    distribution: Literal["normal", "uniform"] = "normal"
    seed: NonNegativeInt = 1


def _options_mapping(value: Any) -> Any:
    """Refuse a non-mapping without echoing it (it may be a credential)."""
    if value is not None and not isinstance(value, Mapping):
        what = type(value).__name__
        raise ValueError(f"must be a mapping of fsspec options (endpoint_url: ..., anon: ...), not a {what}")
    return value


StorageOptions = Annotated[
    dict[str, Any] | None,
    BeforeValidator(_options_mapping),
    Field(
        description="fsspec options of a URL store (endpoint_url, anon, profile, client_kwargs, ...); "
        "never stored, hashed or printed"
    ),
]


class ZarrInputs(Strict):
    """X read from a Zarr array of shape (N, n)."""

    kind: Literal["zarr"]
    path: InputLocation
    array: str | None = Field(None, description="array name inside a group store")
    storage_options: StorageOptions = None


class NpyInputs(Strict):
    """X read (memory-mapped) from a .npy file of shape (N, n)."""

    kind: Literal["npy"]
    path: InputPath


Inputs = Annotated[RandomInputs | ZarrInputs | NpyInputs, Field(discriminator="kind")]


# ---- vectors ---------------------------------------------------------------------------------


class RandomVectors(Strict):
    """K random cotangents/tangents per sample (or K shared ones), a pure function of the seed."""

    kind: Literal["random"]
    distribution: Literal["normal", "rademacher"] = "normal"
    count: PositiveInt = 1
    shared: bool = False
    seed: NonNegativeInt = 2


class BasisVectors(Strict):
    """The unit basis of the vector space: K = m (vjp) or n (jvp), shared by all samples."""

    kind: Literal["basis"]


class OnesVectors(Strict):
    """The all-ones vector, one per sample: the ``y.sum().backward()`` case."""

    kind: Literal["ones"]


class ZarrVectors(Strict):
    """Vectors from a Zarr array: (N, K, d) or (N, d) per sample, (K, d) when shared."""

    kind: Literal["zarr"]
    path: InputLocation
    array: str | None = None
    shared: bool = False
    storage_options: StorageOptions = None


class NpyVectors(Strict):
    """Vectors from a .npy file: (N, K, d) or (N, d) per sample, (K, d) when shared."""

    kind: Literal["npy"]
    path: InputPath
    shared: bool = False


Vectors = Annotated[
    RandomVectors | BasisVectors | OnesVectors | ZarrVectors | NpyVectors,
    Field(discriminator="kind"),
]


# ---- output, chunks, cluster -----------------------------------------------------------------


class OutputConfig(Strict):
    store: OutputLocation
    storage_options: StorageOptions = None
    save_outputs: bool = True
    dtype: Dtype | None = Field(None, description="cast on write; default: the compute dtype")
    compression: Literal["zstd", "blosc", "none"] = "zstd"
    overwrite: bool = False
    products: bool = Field(True, description="store the per-sample products; false: only reductions")

    @field_validator("storage_options")
    @classmethod
    def _only_for_urls(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if value is not None and isinstance(info.data.get("store"), Path):
            raise ValueError("only for a URL store (s3://bucket/job.zarr, ...), not a local path")
        return value


class ChunksConfig(Strict):
    samples: PositiveInt | Literal["auto"] = "auto"
    vectors: PositiveInt | Literal["auto"] = "auto"
    task_memory: ByteSize = ByteSize(256 * 2**20)

    @field_validator("task_memory")
    @classmethod
    def _positive(cls, value: ByteSize) -> ByteSize:
        if value <= 0:
            raise ValueError("must be positive, e.g. 256MiB")
        return value


def _is_loopback(host: str) -> bool:
    return host in {"localhost", "::1", "[::1]"} or host.startswith("127.")


class LocalClusterConfig(Strict):
    kind: Literal["local"] = "local"
    workers: PositiveInt = 2
    threads_per_worker: PositiveInt = 1
    memory_limit: ByteSize = ByteSize(4 * 2**30)
    dashboard: str | None = Field(
        "127.0.0.1:8787", description="host:port on loopback, or null for no dashboard"
    )

    @field_validator("dashboard")
    @classmethod
    def _loopback(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, _, port = value.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"expected host:port, got {value!r}")
        if host and not _is_loopback(host):
            raise ValueError(f"local clusters listen on loopback only; got host {host!r}")
        return f"{host or '127.0.0.1'}:{port}"


class TLSConfig(Strict):
    ca_file: InputPath
    cert_file: InputPath
    key_file: InputPath


class AddressClusterConfig(Strict):
    kind: Literal["address"]
    address: str = Field(pattern=r"^(tcp|tls|ucx|inproc)://\S+$")
    tls: TLSConfig | None = None


def _seconds(value: Any) -> Any:
    """A duration: seconds, or text such as ``90s``, ``30m``, ``2h`` or ``1 hour`` (Dask's notation)."""
    if isinstance(value, str):
        from dask.utils import parse_timedelta

        try:
            return parse_timedelta(value)
        except (KeyError, ValueError, TypeError):
            raise ValueError(f"expected a duration like 90s, 30m or 2h, got {value!r}") from None
    return value


Seconds = Annotated[float, BeforeValidator(_seconds), Field(gt=0)]


class JobqueueClusterConfig(Strict):
    """SLURM or PBS through dask-jobqueue (``pip install 'jacrun[hpc]'``): each batch job runs workers."""

    kind: Literal["slurm", "pbs"]
    queue: str | None = Field(None, description="partition (SLURM) or queue (PBS)")
    account: str | None = Field(None, description="account / project charged")
    cores: PositiveInt = Field(1, description="cores per batch job")
    processes: PositiveInt = Field(1, description="worker processes per batch job")
    memory: ByteSize = Field(ByteSize(4 * 2**30), description="memory per batch job")
    walltime: str = Field("01:00:00", pattern=r"^(\d+-)?\d{1,3}:\d{2}(:\d{2})?$")
    jobs: PositiveInt = Field(1, description="batch jobs to start")
    interface: str | None = Field(None, description="network interface, e.g. ib0")
    local_directory: str | None = None
    job_extra_directives: list[str] = Field(default_factory=list)
    job_script_prologue: list[str] = Field(
        default_factory=list, description="shell lines run before the worker, e.g. module load"
    )
    dashboard: str | None = Field(
        "127.0.0.1:8787",
        description="host:port of the scheduler's dashboard: loopback (reach it with ssh -L), "
        "0.0.0.0:8787 to open it to the network, or null for none",
    )
    startup_timeout: Seconds | None = Field(
        3600.0,
        description="SLURM: end the run (exit 1) if no worker joins within this time "
        "(queue wait included), e.g. 30m; null: wait as long as SLURM keeps the jobs pending",
    )

    @field_validator("dashboard")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, colon, port = value.rpartition(":")
        if not colon or not port.isdigit():
            raise ValueError(f"expected host:port, got {value!r}")
        return value

    @model_validator(mode="after")
    def _installed(self) -> JobqueueClusterConfig:
        import importlib.util

        if importlib.util.find_spec("dask_jobqueue") is None:
            raise ValueError(f"kind {self.kind} needs dask-jobqueue: pip install 'jacrun[hpc]'")
        if self.processes > self.cores:
            raise ValueError(f"processes ({self.processes}) cannot exceed cores ({self.cores})")
        return self

    @property
    def workers(self) -> int:
        return self.jobs * self.processes

    @property
    def memory_limit(self) -> int:
        return int(self.memory) // self.processes


Cluster = Annotated[
    LocalClusterConfig | AddressClusterConfig | JobqueueClusterConfig, Field(discriminator="kind")
]


# ---- sparsity --------------------------------------------------------------------------------


class SparsityFile(Strict):
    """A pattern saved with ``scipy.sparse.save_npz``: its nonzeros are J's structural nonzeros."""

    file: InputPath


def _sparsity_tag(value: Any) -> str:
    return "file" if isinstance(value, Mapping | SparsityFile) else "setting"


Sparsity = Annotated[
    Annotated[Literal["auto", "dense", "detect"], Tag("setting")] | Annotated[SparsityFile, Tag("file")],
    Discriminator(_sparsity_tag),
]
"""A setting, or a mapping ``{file: ...}``: one branch is validated, so an error names one problem."""


# ---- the job ---------------------------------------------------------------------------------


SECRET_FIELDS = {section: {"storage_options"} for section in ("inputs", "vectors", "output")}
"""Left out of the stored config and its hash: they may hold credentials."""


class JobConfig(Strict):
    """A whole job: what to compute, on what, into which store, where."""

    name: str = Field("job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    mode: Literal["vjp", "jvp", "jacobian"]
    function: SerializeAsAny[FunctionSpec]
    inputs: Inputs
    vectors: Vectors | None = None
    strategy: Literal["rev", "fwd", "auto"] = Field(
        "auto", description="jacobian only: rev (m VJPs), fwd (n JVPs) or auto (the fewer)"
    )
    sparsity: Sparsity = Field(
        "auto",
        description="jacobian only: auto (sparse when the function declares a pattern that needs "
        "fewer products), dense, detect (JAX targets), or {file: pattern.npz}",
    )
    reduce: list[Reduction] = Field(
        default_factory=list, description="reductions over samples: mean, gram, norms"
    )
    output: OutputConfig
    chunks: ChunksConfig = ChunksConfig()
    cluster: Cluster = LocalClusterConfig()
    nan_policy: Literal["raise", "propagate"] = "raise"
    retries: NonNegativeInt = Field(2, description="times a failed block is retried")

    _source: tuple[str, dict[Loc, int], frozenset[Loc]] | None = PrivateAttr(None)
    """(file name, YAML line of every key path, keys set by --set), for :meth:`locate`."""

    @model_validator(mode="before")
    @classmethod
    def _local_by_default(cls, data: Any) -> Any:
        cluster = data.get("cluster") if isinstance(data, dict) else None
        if isinstance(cluster, dict) and "kind" not in cluster:
            data = {**data, "cluster": {"kind": "local", **cluster}}
        return data

    @model_validator(mode="after")
    def _vectors_match_mode(self) -> JobConfig:
        if self.mode == "jacobian" and self.vectors is not None:
            raise ValueError("vectors: not used in mode jacobian (the basis is implied); remove it")
        if self.mode != "jacobian" and self.vectors is None:
            raise ValueError(f"vectors: required in mode {self.mode} (e.g. kind: random)")
        if self.mode != "jacobian" and "sparsity" in self.model_fields_set:
            raise ValueError(f"sparsity: only for mode jacobian, not {self.mode}; remove it")
        if len(set(self.reduce)) != len(self.reduce):
            raise ValueError(f"reduce: lists a reduction twice: {self.reduce}")
        if not self.output.products and not self.reduce:
            raise ValueError(
                "output.products: false stores no products, so it needs reductions "
                "(reduce: [mean, gram, norms])"
            )
        return self

    def locate(self, message: str) -> str:
        """``job.yaml:12: inputs.path: ...`` for a message that starts with a config key.

        For problems found after loading (an input file's shape, the plan, the store): the
        message gets the file and YAML line of its key, or ``--set KEY`` when the key came
        from an override. Messages that start otherwise, and in-memory configs, are unchanged.
        """
        match = _KEY_PREFIX.match(message)
        if self._source is None or match is None:
            return message
        loc = tuple(int(p) if p.isdigit() else p for p in match.group(1).split("."))
        if loc[0] not in type(self).model_fields:
            return message
        filename, lines, overridden = self._source
        for depth in range(len(loc), 0, -1):
            if loc[:depth] in overridden:
                return f"--set {'.'.join(map(str, loc[:depth]))}: {message}"
        line = next((lines[loc[:d]] for d in range(len(loc), 0, -1) if loc[:d] in lines), None)
        return f"{filename}:{line}: {message}" if line else f"{filename}: {message}"

    @property
    def compute_dtype(self) -> str:
        return self.function.dtype

    @property
    def output_dtype(self) -> str:
        return self.output.dtype or self.function.dtype

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON types (absolute paths, defaults filled in)."""
        return self.model_dump(mode="json", exclude=SECRET_FIELDS)

    def content_hash(self) -> str:
        """sha256 of everything that determines the stored numbers.

        Excludes where and how the job runs (cluster, retries, chunking, the store's own path,
        overwrite, name), so a job can resume on another cluster or with other chunk sizes
        that match the store's chunking.
        """
        from jacrun.sources import RANDOM_NUMBERS

        data = self.to_dict()
        for key in ("cluster", "retries", "chunks", "name"):
            data.pop(key, None)
        for key in ("store", "overwrite"):
            data["output"].pop(key, None)
        data["random_numbers"] = RANDOM_NUMBERS  # how random inputs and vectors are drawn
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


# ---- loading ---------------------------------------------------------------------------------


def load_config(
    path: str | Path,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
) -> JobConfig:
    """Read, override and validate a YAML job config.

    ``overrides`` are ``{"chunks.samples": 1024}`` or ``["chunks.samples=1024"]`` (values
    parsed as YAML scalars). Raises :class:`ConfigError` listing every problem found.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config: {exc.strerror or exc}") from None
    data, lines = parse_yaml(text, str(path))
    if data is None and not overrides:
        raise ConfigError(
            f"{path}: the config is empty; a job needs at least mode, function, inputs, vectors "
            "(except in mode jacobian) and output"
        )
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}:{lines.get((), 1)}: the config must be a mapping of keys, got {type(data).__name__}"
        )
    overridden = apply_overrides(data, overrides, str(path))
    data.setdefault("name", _default_name(path))
    config = validate(data, path.parent.resolve(), str(path), lines, overridden)
    config._source = (str(path), lines, frozenset(overridden))
    return config


def config_from_dict(data: Mapping[str, Any], base_dir: str | Path | None = None) -> JobConfig:
    """Validate an in-memory config (relative paths resolve against ``base_dir``)."""
    base = Path(base_dir or Path.cwd()).resolve()
    return validate(json.loads(json.dumps(dict(data), default=str)), base, "<config>", {}, set())


def with_scheduler(config: JobConfig, address: str) -> JobConfig:
    """The config with its cluster section replaced by a scheduler address (``--scheduler``)."""
    try:
        cluster = AddressClusterConfig(kind="address", address=address)
    except ValidationError:
        raise ConfigError(
            f"--scheduler: {address!r} is not a scheduler address like tcp://host:8786"
        ) from None
    return config.model_copy(update={"cluster": cluster})


def _default_name(path: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "_.-" else "-" for c in path.stem).lstrip("_.-")
    return stem[:64] or "job"


class _LineLoader(yaml.SafeLoader):
    """The safe loader; composes nodes so we can record lines and refuse duplicate keys."""


def parse_yaml(text: str, filename: str) -> tuple[Any, dict[Loc, int]]:
    """Parse YAML safely; return the data and a map from key paths to 1-based line numbers."""
    try:
        node = yaml.compose(text, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_message(exc, filename)) from None
    if node is None:
        return None, {}
    lines: dict[Loc, int] = {}
    _walk(node, (), lines, filename)
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_message(exc, filename)) from None
    return data, lines


def _yaml_message(exc: yaml.YAMLError, filename: str) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    if isinstance(exc, yaml.constructor.ConstructorError) and "tag" in str(problem):
        problem = f"{problem} (YAML tags are not allowed in job configs)"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None and mark is not None and context_mark.line != mark.line:
        problem = f"{problem} ({context} started on line {context_mark.line + 1})"
    return f"{filename}{line}: invalid YAML: {problem}"


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int], filename: str) -> None:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                where = ".".join(map(str, (*loc, key)))
                raise ConfigError(
                    f"{filename}:{line}: {where}: duplicate key (first set on line {seen[key]})"
                )
            seen[key] = line
            lines[(*loc, key)] = line
            _walk(value_node, (*loc, key), lines, filename)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*loc, index), lines, filename)


def parse_assignments(items: Iterable[str], flag: str) -> list[tuple[tuple[str, ...], Any]]:
    """``KEY=VALUE`` strings (``--set``, ``-o``) as (dotted key path, value parsed as YAML).

    One parser for every command-line assignment: a ConfigError names the flag and the key of
    each mistake, never the value (a storage option's value may be a secret). An empty value
    is None.
    """
    pairs: list[tuple[tuple[str, ...], Any]] = []
    for item in items:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        parts = tuple(part.strip() for part in key.split("."))
        if not sep or not key:
            raise ConfigError(f"{flag} {key or '(empty)'}: expected KEY=VALUE, e.g. {_EXAMPLES[flag]}")
        if not all(parts):
            raise ConfigError(f"{flag} {key}: a key path has no empty parts (a.b.c)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(
                f"{flag} {key}: the value is not valid YAML; quote it to pass a string ({key}='\"...\"')"
            ) from None
        pairs.append((parts, value))
    return pairs


_EXAMPLES = {"--set": "chunks.samples=1024", "--storage-option": "endpoint_url=http://127.0.0.1:9000"}


def assign(data: dict[str, Any], parts: tuple[str, ...], value: Any, flag: str) -> None:
    """Set ``data[a][b][c] = value`` for the key path (a, b, c), creating sections on the way;
    a ConfigError when a section on the way holds a value (``a=1`` then ``a.b=2``)."""
    target = data
    for depth, part in enumerate(parts[:-1]):
        child = target.get(part)
        if child is None:
            child = target[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"{flag} {'.'.join(parts)}: {where} is not a section")
        target = child
    target[parts[-1]] = value


def nested_assignments(items: Iterable[str], flag: str) -> dict[str, Any]:
    """``-o a.b=1 -o c=2`` as ``{"a": {"b": 1}, "c": 2}`` (see :func:`parse_assignments`)."""
    data: dict[str, Any] = {}
    for parts, value in parse_assignments(items, flag):
        assign(data, parts, value, flag)
    return data


def apply_overrides(
    data: dict[str, Any], overrides: Mapping[str, Any] | Iterable[str] | None, filename: str
) -> set[Loc]:
    """Set dotted keys in ``data`` in place; return the overridden key paths."""
    if not overrides:
        return set()
    if isinstance(overrides, Mapping):
        items = [(tuple(str(key).split(".")), value) for key, value in overrides.items()]
    else:
        items = parse_assignments(overrides, "--set")
    for parts, value in items:
        assign(data, parts, value, "--set")
    return {parts for parts, _ in items}


def validate(
    data: dict[str, Any], base_dir: Path, filename: str, lines: dict[Loc, int], overridden: set[Loc]
) -> JobConfig:
    """Validate raw config data; raise one ConfigError listing every problem with its line."""
    context = {"base_dir": base_dir}
    problems: list[tuple[Loc, str]] = []
    raw_function = data.get("function")
    if isinstance(raw_function, Mapping):
        try:
            data = {**data, "function": parse_spec(raw_function, base_dir)}
        except ValidationError as exc:
            problems += [_problem(data, ("function",), e) for e in exc.errors()]
        except ValueError as exc:
            problems.append((("function", "kind"), str(exc)))
    elif raw_function is not None:
        problems.append((("function",), "must be a mapping with `kind` (see `jacrun functions`)"))
    try:
        config = JobConfig.model_validate(data, context=context)
    except ValidationError as exc:
        for error in exc.errors():
            if problems and error["loc"][:1] == ("function",):
                continue  # already reported in detail above
            problems.append(_problem(data, (), error))
    if problems:
        merged = _merge(problems)
        raise ConfigError("\n".join(_format(filename, loc, msg, lines, overridden) for loc, msg in merged))
    return config


def _merge(problems: list[tuple[Loc, str]]) -> list[tuple[Loc, str]]:
    """One line per key: a value that fits no branch of a union (``PositiveInt | 'auto'``) reads
    ``Input should be greater than 0 or 'auto'``; repeated messages are dropped."""
    by_loc: dict[Loc, list[str]] = {}
    for loc, message in problems:
        if message not in by_loc.setdefault(loc, []):
            by_loc[loc].append(message)
    merged: list[tuple[Loc, str]] = []
    should = "Input should be "
    for loc, messages in by_loc.items():
        if len(messages) > 1 and all(m.startswith(should) for m in messages):
            merged.append((loc, should + " or ".join(m.removeprefix(should) for m in messages)))
        else:
            merged += [(loc, m) for m in messages]
    return merged


def _problem(root: Mapping[str, Any], prefix: Loc, error: Mapping[str, Any]) -> tuple[Loc, str]:
    """One pydantic error as (key path from the top of the config, readable message)."""
    section: Any = root
    for part in prefix:
        section = section[part]
    loc = (*prefix, *_clean_loc(section, tuple(error["loc"])))
    message = error["msg"]
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        message = "unknown key" + _suggestion(root, loc)
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "value_error":
        message = message.removeprefix("Value error, ")
        key, sep, rest = message.partition(": ")
        if not loc and sep and key.split(".")[0] in JobConfig.model_fields:
            loc, message = tuple(key.split(".")), rest  # "vectors: ..." from a model check
    elif kind == "union_tag_invalid":
        expected = error.get("ctx", {}).get("expected_tags", "")
        message = f"unknown kind {value.get('kind')!r}; expected one of {expected}"
        loc = (*loc, "kind")
    elif kind == "union_tag_not_found":
        message = f"required key is missing; one of {_kinds_of(loc)}"
        loc = (*loc, "kind")
    elif kind in {"model_type", "model_attributes_type", "dict_type"}:
        message = f"must be a section of keys (key: value lines), got {type(value).__name__} {value!r}"
    elif kind in {"byte_size", "byte_size_unit"}:
        message = f"expected a size like 4GiB or 512MiB, got {value!r}"
    elif kind == "literal_error" and loc[:1] == ("reduce",):
        message = f"unknown reduction {value!r}; expected mean, gram or norms"
    elif kind == "literal_error" and loc == ("sparsity",):
        message = f"expected auto, dense, detect or {{file: pattern.npz}}, got {value!r}"
    elif kind == "string_pattern_mismatch" and loc and loc[-1] in _PATTERN_HINTS:
        message = f"expected {_PATTERN_HINTS[loc[-1]]}, got {value!r}"
    return loc, message


_PATTERN_HINTS = {
    "name": "letters, digits and _ . - (starting with a letter or digit, at most 64)",
    "address": "a scheduler address like tcp://host:8786 or tls://host:8786",
    "walltime": "HH:MM:SS or D-HH:MM:SS, e.g. 01:00:00",
}


def _kinds_of(loc: Loc) -> str:
    """The accepted ``kind`` values of a tagged-union section, e.g. 'random', 'zarr', 'npy'."""
    members = _UNION_MEMBERS.get(loc[-1:], {})
    return ", ".join(repr(k) for k in members) or "see the README"


def _clean_loc(data: Any, loc: Loc) -> Loc:
    """Drop the discriminator tags pydantic inserts into locations (``inputs.random.samples``)."""
    clean: list[Any] = []
    node: Any = data
    for index, part in enumerate(loc):
        if isinstance(node, Mapping):
            if node.get("kind") == part and index + 1 < len(loc):
                # the tag of a tagged union, before the field (cluster kind 'address' also has
                # a field 'address'): skip it once
                node = {**node, "kind": _UNKNOWN}
                continue
            if part in node:
                clean.append(part)
                node = node[part]
                continue
            if node.get("kind") == part or part in {"function-after", "model-fields"}:
                continue
            clean.append(part)
            node = _UNKNOWN
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            clean.append(part)
            node = node[part]
        elif node is _UNKNOWN:
            clean.append(part)
        else:
            break  # a scalar has no keys: the rest names union branches ('constrained-int')
    return tuple(clean)


_UNKNOWN = object()


_SECTION_FIELDS: dict[Loc, Iterable[str]] = {
    (): JobConfig.model_fields,
    ("output",): OutputConfig.model_fields,
    ("chunks",): ChunksConfig.model_fields,
}

_UNION_MEMBERS: dict[Loc, dict[str, type[BaseModel]]] = {
    ("inputs",): {"random": RandomInputs, "zarr": ZarrInputs, "npy": NpyInputs},
    ("vectors",): {
        "random": RandomVectors,
        "basis": BasisVectors,
        "ones": OnesVectors,
        "zarr": ZarrVectors,
        "npy": NpyVectors,
    },
    ("cluster",): {
        "local": LocalClusterConfig,
        "address": AddressClusterConfig,
        "slurm": JobqueueClusterConfig,
        "pbs": JobqueueClusterConfig,
    },
}


def _suggestion(data: Any, loc: Loc) -> str:
    """``; did you mean 'samples'?`` for a misspelt key of a known section."""
    fields = _SECTION_FIELDS.get(loc[:-1])
    section = data.get(loc[0]) if isinstance(data, Mapping) and len(loc) == 2 else None
    kind = section.get("kind") if isinstance(section, Mapping) else None
    if fields is None and loc[:1] == ("function",) and len(loc) == 2:
        if kind in kinds():
            fields = kinds()[kind].spec_model.model_fields
    elif fields is None and loc[:-1] in _UNION_MEMBERS and len(loc) == 2:
        model = _UNION_MEMBERS[loc[:-1]].get(kind or ("local" if loc[0] == "cluster" else ""))
        fields = model.model_fields if model else None
    if not fields or not loc:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _format(filename: str, loc: Loc, message: str, lines: dict[Loc, int], overridden: set[Loc]) -> str:
    key = ".".join(str(p) for p in loc) or "(top level)"
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in overridden:
            return f"--set {'.'.join(map(str, loc[:depth]))}: {key}: {message}"
    line = next((lines[loc[:d]] for d in range(len(loc), -1, -1) if loc[:d] in lines), None)
    where = f"{filename}:{line}" if line else filename
    return f"{where}: {key}: {message}"
