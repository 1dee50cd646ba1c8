"""``kind: python``: what it builds, and everything it refuses without calling it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from jacrun.errors import ConfigError
from jacrun.functions import Function, build_function, kinds, parse_spec
from jacrun.functions.python import PythonSpec, TargetError, load_target
from tests.helpers import fresh_targets  # noqa: F401 - an autouse fixture

HERE = __name__  # "tests.test_python_kind" or "test_python_kind", however pytest imports us


# ---- targets defined here ----------------------------------------------------------------------


class SinScale(Function):
    """y = c * sin(x), elementwise (n_in = n_out = n)."""

    def __init__(self, n: int, c: float = 2.0, dtype: np.dtype | str = "float64") -> None:
        self.n_in = self.n_out = n
        self.c = c
        self.dtype = np.dtype(dtype)

    def forward_batch(self, x: np.ndarray) -> np.ndarray:
        return self.c * np.sin(x)

    def vjp_batch(self, x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.forward_batch(x), v * (self.c * np.cos(x))[:, None, :]

    def jvp_batch(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.forward_batch(x), t * (self.c * np.cos(x))[:, None, :]


class Float64Only(SinScale):
    """Takes no dtype parameter: always float64."""

    def __init__(self, n: int) -> None:
        super().__init__(n, dtype="float64")


class ZeroOut(SinScale):
    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.n_out = 0


class Abstract(Function):
    """Forgot its kernels."""


def make_sin(n: int, c: float = 1.0, dtype: str = "float64") -> SinScale:
    """A factory: its return annotation names a Function subclass."""
    return SinScale(n, c, dtype)


def make_liar(n: int) -> SinScale:
    return "not a function"  # type: ignore[return-value]


def make_broken(n: int) -> SinScale:
    raise RuntimeError("boom")


def no_annotation(n):
    return SinScale(n)


def returns_int(n: int) -> int:
    return n


INSTANCE = SinScale(3)
CONSTANT = 42


def spec(target: str, **extra: object) -> dict[str, object]:
    return {"kind": "python", "target": target, **extra}


def write_package(root: Path, name: str, body: str) -> None:
    """A package ``name`` under ``root`` whose ``mod`` module holds ``body``."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    (root / name / "mod.py").write_text(textwrap.dedent(body))


MODULE_BODY = """
    import numpy as np
    from jacrun.functions import Function

    IMPORTS = []
    IMPORTS.append(1)

    class Cube(Function):
        def __init__(self, n: int, dtype=np.float64):
            self.n_in = self.n_out = n
            self.dtype = np.dtype(dtype)

        def forward_batch(self, x):
            return x**3

        def vjp_batch(self, x, v):
            return x**3, v * (3 * x * x)[:, None, :]

        def jvp_batch(self, x, t):
            return x**3, t * (3 * x * x)[:, None, :]

    def cube(n: int) -> Cube:
        return Cube(n)
"""


# ---- what it builds ----------------------------------------------------------------------------


def test_registered_with_its_spec_model() -> None:
    cls = kinds()["python"]
    assert cls.spec_model is PythonSpec
    assert cls.description
    assert all(PythonSpec.model_fields[name].description for name in ("target", "params", "path"))


def test_a_function_subclass_is_built_with_params() -> None:
    f = build_function(spec(f"{HERE}:SinScale", params={"n": 3, "c": 2.0}))
    assert isinstance(f, SinScale)
    assert (f.n_in, f.n_out, f.c, f.dtype) == (3, 3, 2.0, np.dtype("float64"))
    x = np.array([[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]])
    v = np.ones((2, 3))
    y, xbar = f.vjp(x, v)
    np.testing.assert_allclose(y, 2 * np.sin(x))
    np.testing.assert_allclose(xbar, 2 * np.cos(x))


def test_the_section_dtype_is_passed_when_the_target_accepts_one() -> None:
    f = build_function(spec(f"{HERE}:SinScale", params={"n": 2}, dtype="float32"))
    assert f.dtype == np.dtype("float32")
    assert f.forward(np.zeros((1, 2))).dtype == np.float32


def test_a_factory_is_called_with_params() -> None:
    f = build_function(spec(f"{HERE}:make_sin", params={"n": 4, "c": 3.0}))
    assert isinstance(f, SinScale)
    assert (f.n_in, f.c) == (4, 3.0)


def test_a_package_next_to_the_config_is_found_through_path(tmp_path: Path) -> None:
    name = f"plug_{uuid.uuid4().hex[:8]}"
    write_package(tmp_path / "plugins", name, MODULE_BODY)
    parsed = parse_spec(spec(f"{name}.mod:Cube", path="plugins", params={"n": 2}), base_dir=tmp_path)
    assert parsed.path == (tmp_path / "plugins").resolve()
    f = build_function(parsed)
    assert sys.path[0] == str((tmp_path / "plugins").resolve())
    _, ydot = f.jvp(np.array([[1.0, 2.0]]), np.ones((1, 2)))
    np.testing.assert_allclose(ydot, [[3.0, 12.0]])
    factory = build_function(parsed.model_copy(update={"target": f"{name}.mod:cube"}))
    assert type(factory).__name__ == "Cube"


def test_targets_are_imported_and_resolved_once(tmp_path: Path) -> None:
    name = f"plug_{uuid.uuid4().hex[:8]}"
    write_package(tmp_path, name, MODULE_BODY)
    first = load_target(f"{name}.mod:Cube", tmp_path)
    assert load_target(f"{name}.mod:Cube", tmp_path) is first
    for _ in range(3):
        build_function(spec(f"{name}.mod:Cube", path=str(tmp_path), params={"n": 1}))
    assert sys.modules[f"{name}.mod"].IMPORTS == [1]
    assert sys.path.count(str(tmp_path.resolve())) == 1


def test_a_same_named_package_from_another_path_is_refused(tmp_path: Path) -> None:
    name = f"plug_{uuid.uuid4().hex[:8]}"
    write_package(tmp_path / "a", name, MODULE_BODY)
    write_package(tmp_path / "b", name, MODULE_BODY)
    build_function(spec(f"{name}.mod:Cube", path=str(tmp_path / "a"), params={"n": 1}))
    with pytest.raises(TargetError, match="already imported from .*a"):
        build_function(spec(f"{name}.mod:Cube", path=str(tmp_path / "b"), params={"n": 1}))


# ---- what it refuses, without calling it -------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("numpy:sin", "ufunc"),
        ("os:system", "built-in function 'system'"),
        ("os:path", "is a module"),
        ("subprocess:Popen", "not a Function subclass"),
        ("builtins:eval", "built-in function 'eval'"),
        (f"{HERE}:no_annotation", "no return annotation"),
        (f"{HERE}:returns_int", "return annotation <class 'int'>"),
        (f"{HERE}:INSTANCE", "a Function instance"),
        (f"{HERE}:CONSTANT", "a value of type int"),
        (f"{HERE}:Abstract", "abstract class Abstract: implement forward_batch, jvp_batch, vjp_batch"),
        ("jacrun.functions:Function", "abstract"),
    ],
)
def test_anything_else_at_the_target_is_refused(target: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        build_function(spec(target))
    message = str(info.value)
    assert repr(target) in message
    assert reason in message
    assert isinstance(info.value, ConfigError)


def test_os_system_is_never_called(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, ...]] = []

    def recorder(*args: object, **kwargs: object) -> int:
        calls.append(args)
        return 0

    monkeypatch.setattr(os, "system", recorder)
    monkeypatch.setattr(subprocess, "Popen", recorder)
    for target in ("os:system", "subprocess:Popen"):
        with pytest.raises(ValueError, match=re.escape(repr(target))):
            build_function(spec(target, params={"command": "echo pwned"}))
    assert calls == []


def test_a_target_that_is_not_module_colon_attr_is_a_validation_error() -> None:
    for target in ("os", "os.system", "os:system()", "os:system\n", "os:path.join", "../evil:x", ""):
        with pytest.raises(ValidationError, match="package.module:attr"):
            parse_spec(spec(target))


def test_a_missing_module_is_named_with_a_hint() -> None:
    with pytest.raises(TargetError, match=r"no module named 'no_such_module_xyz'.*set `path:`"):
        build_function(spec("no_such_module_xyz.sub:Thing"))


def test_a_missing_dependency_of_the_module_is_named(tmp_path: Path) -> None:
    name = f"plug_{uuid.uuid4().hex[:8]}"
    write_package(tmp_path, name, "import not_installed_dependency_xyz\n")
    with pytest.raises(
        TargetError, match="importing .*failed: No module named 'not_installed_dependency_xyz'"
    ):
        build_function(spec(f"{name}.mod:Thing", path=str(tmp_path)))


def test_a_module_that_raises_on_import_is_reported(tmp_path: Path) -> None:
    name = f"plug_{uuid.uuid4().hex[:8]}"
    write_package(tmp_path, name, "raise RuntimeError('bad module')\n")
    with pytest.raises(TargetError, match="RuntimeError: bad module"):
        build_function(spec(f"{name}.mod:Thing", path=str(tmp_path)))


def test_a_missing_attribute_is_named() -> None:
    with pytest.raises(TargetError, match=f"module '{HERE}' .*has no attribute 'Nope'"):
        build_function(spec(f"{HERE}:Nope"))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"n": 3, "bogus": 1}, "unexpected keyword argument 'bogus'"),
        ({}, "missing a required argument: 'n'"),
    ],
)
def test_params_the_target_rejects_are_named(params: dict[str, object], message: str) -> None:
    target = f"{HERE}:SinScale"
    with pytest.raises(TargetError) as info:
        build_function(spec(target, params=params))
    assert repr(target) in str(info.value)
    assert message in str(info.value)
    assert "(n: 'int', c: 'float' = 2.0" in str(info.value)  # shows the signature


def test_a_failing_constructor_is_reported() -> None:
    with pytest.raises(TargetError, match=r"building target .*make_broken.* failed: RuntimeError: boom"):
        build_function(spec(f"{HERE}:make_broken", params={"n": 1}))


def test_a_factory_returning_a_non_function_is_refused() -> None:
    with pytest.raises(TargetError, match=r"make_liar' returned str, not a jacrun Function"):
        build_function(spec(f"{HERE}:make_liar", params={"n": 1}))


def test_non_positive_sizes_are_refused() -> None:
    with pytest.raises(TargetError, match="n_out = 0; it must be a positive int"):
        build_function(spec(f"{HERE}:ZeroOut", params={"n": 2}))


def test_a_dtype_the_target_cannot_honour_is_refused() -> None:
    assert build_function(spec(f"{HERE}:Float64Only", params={"n": 2})).dtype == np.float64
    with pytest.raises(
        TargetError, match="computes in float64 but the config asks for float32.*accept a `dtype`"
    ):
        build_function(spec(f"{HERE}:Float64Only", params={"n": 2}, dtype="float32"))


def test_dtype_belongs_to_the_section_not_params() -> None:
    with pytest.raises(ValidationError, match="not in `params`"):
        parse_spec(spec(f"{HERE}:SinScale", params={"n": 2, "dtype": "float32"}))


def test_path_must_be_an_existing_folder(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no such file or folder"):
        parse_spec(spec(f"{HERE}:SinScale", path="missing"), base_dir=tmp_path)
    (tmp_path / "file.py").write_text("")
    with pytest.raises(ValidationError, match="must be a folder"):
        parse_spec(spec(f"{HERE}:SinScale", path="file.py"), base_dir=tmp_path)
