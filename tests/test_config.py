"""Config loading: defaults, paths, overrides, and one clear message per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from jacrun.config import config_from_dict, load_config
from jacrun.errors import ConfigError
from tests.helpers import REPO, job_config, write_config


def test_quickstart_loads_with_design_defaults():
    cfg = load_config(REPO / "configs" / "quickstart.yaml")
    assert cfg.mode == "vjp" and cfg.function.kind == "mlp"
    assert cfg.function.sizes == [64, 256, 256, 10]
    assert cfg.chunks.task_memory == 256 * 2**20
    assert cfg.cluster.kind == "local" and cfg.cluster.dashboard == "127.0.0.1:8787"
    assert cfg.output.store == (REPO / "results" / "quickstart.zarr").resolve()


def test_defaults_fill_missing_sections(tmp_path):
    raw = job_config()
    del raw["chunks"], raw["cluster"]
    cfg = load_config(write_config(tmp_path, raw))
    assert cfg.chunks.samples == "auto" and cfg.cluster.workers == 2
    assert cfg.nan_policy == "raise" and cfg.retries == 2 and cfg.output.compression == "zstd"


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    cfg = load_config(write_config(tmp_path / "sub", job_config(store="res/out.zarr")))
    assert cfg.output.store == tmp_path / "sub" / "res" / "out.zarr"


def test_overrides_are_typed_and_nested(tmp_path):
    path = write_config(tmp_path, job_config())
    cfg = load_config(path, ["chunks.samples=64", "vectors.shared=true", "name=other"])
    assert cfg.chunks.samples == 64 and cfg.vectors.shared is True and cfg.name == "other"
    cfg = load_config(path, {"inputs.samples": 7})
    assert cfg.inputs.samples == 7


def test_hash_ignores_where_it_runs_but_not_what_it_computes(tmp_path):
    base = config_from_dict(job_config(), tmp_path)
    moved = config_from_dict(
        job_config(cluster={"kind": "local", "workers": 2}, chunks={"samples": 50}), tmp_path
    )
    assert base.content_hash() == moved.content_hash()
    reseeded = config_from_dict(job_config(vectors={"kind": "random", "count": 3, "seed": 9}), tmp_path)
    assert base.content_hash() != reseeded.content_hash()


def bad(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


GOOD = """\
mode: vjp
function:
  kind: linear
  n_in: 5
  n_out: 3
inputs:
  kind: random
  samples: 10
vectors:
  kind: random
output:
  store: out.zarr
"""


def test_good_text_is_good(tmp_path):
    (tmp_path / "good.yaml").write_text(GOOD)
    assert load_config(tmp_path / "good.yaml").function.n_in == 5


@pytest.mark.parametrize(
    ("replace", "expected"),
    [
        (("  samples: 10", "  sampels: 10"), "bad.yaml:8: inputs.sampels: unknown key"),
        (("  samples: 10", "  samples: ten"), "bad.yaml:8: inputs.samples: Input should be a valid integer"),
        (("  samples: 10", "  samples: -4"), "bad.yaml:8: inputs.samples: Input should be greater than 0"),
        (("  n_in: 5", "  n_in: 5\n  bogus: 1"), "bad.yaml:5: function.bogus: unknown key"),
        (("mode: vjp", "mode: hessian"), "bad.yaml:1: mode: Input should be 'vjp', 'jvp' or 'jacobian'"),
        (
            ("  kind: random\n  samples", "  kind: rand\n  samples"),
            "bad.yaml:7: inputs.kind: unknown kind 'rand'",
        ),
        (
            ("  store: out.zarr", "  store: out.zarr\n  store: again.zarr"),
            "bad.yaml:13: output.store: duplicate key (first set on line 12)",
        ),
        (("  samples: 10", "  samples: !!python/object:os.system {}"), "bad.yaml:8: invalid YAML"),
        (("  kind: linear", "  kind: nonesuch"), "function.kind: unknown function kind 'nonesuch'"),
        (("output:", "chunks:\n  task_memory: .nan\noutput:"), "chunks.task_memory"),
    ],
)
def test_bad_config_names_file_line_and_key(tmp_path, replace, expected):
    old, new = replace
    assert old in GOOD
    message = bad(tmp_path, GOOD.replace(old, new, 1))
    assert expected in message
    assert "Traceback" not in message


def test_unknown_top_level_key_suggests_the_right_one(tmp_path):
    message = bad(tmp_path, GOOD + "nan_polcy: raise\n")
    assert "bad.yaml:13: nan_polcy: unknown key; did you mean 'nan_policy'?" in message


def test_every_problem_is_reported(tmp_path):
    message = bad(tmp_path, GOOD.replace("  samples: 10", "  samples: 0").replace("mode: vjp", "mode: x"))
    assert "inputs.samples" in message and "mode" in message


def test_missing_input_file(tmp_path):
    text = GOOD.replace("  kind: random\n  samples: 10", "  kind: npy\n  path: nothere.npy")
    assert f"bad.yaml:8: inputs.path: no such file or folder: {tmp_path / 'nothere.npy'}" in bad(
        tmp_path, text
    )


def test_vectors_must_match_mode(tmp_path):
    assert "vectors: not used in mode jacobian" in bad(tmp_path, GOOD.replace("mode: vjp", "mode: jacobian"))
    text = GOOD.replace("vectors:\n  kind: random\n", "")
    assert "vectors: required in mode vjp" in bad(tmp_path, text)


def test_not_a_mapping_and_unreadable(tmp_path):
    assert "must be a mapping" in bad(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_override_errors_name_the_override(tmp_path):
    path = write_config(tmp_path, job_config())
    with pytest.raises(ConfigError, match=r"--set inputs.samples: inputs.samples: Input should be greater"):
        load_config(path, ["inputs.samples=-1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["inputs.samples"])


def test_dashboard_must_be_loopback(tmp_path):
    raw = job_config(cluster={"kind": "local", "dashboard": "0.0.0.0:8787"})
    with pytest.raises(ConfigError, match="loopback"):
        load_config(write_config(tmp_path, raw))
