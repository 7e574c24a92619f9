"""The shape of the code: module boundaries the house style asks for, checked
on the source (AST), so that a regression fails here instead of in review."""

import ast
import inspect
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnlab
import bnlab.collectives
import bnlab.linen
import bnlab.nnx
from bnlab import stats

BNLAB = Path(bnlab.__file__).resolve().parent
CORE = ("batch_norm", "checks", "collectives", "linen", "modules", "nnx", "stats")
CORE += ("variants", "precise", "diagnostics")


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in sorted(BNLAB.rglob("*.py")):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "bnlab"
            ):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.endswith("__"):
                        offenders.append(f"{path.name}: {node.module}.{alias.name}")
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in CORE
            ):
                offenders.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert not offenders, "make these public in their module: " + ", ".join(offenders)


@pytest.mark.parametrize("name", CORE)
def test_private_helpers_take_at_most_four_positional_arguments(name):
    # Helpers with ~10 positional arguments invite swapped arguments that
    # still run (e.g. center/offset, scale/bias); beyond four, keywords.
    long = []
    for node in ast.walk(_tree(BNLAB / f"{name}.py")):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("_"):
            positional = [a.arg for a in node.args.posonlyargs + node.args.args]
            positional = [a for a in positional if a not in ("self", "cls")]
            if len(positional) > 4:
                long.append(f"{node.name}({', '.join(positional)})")
    assert not long, f"bnlab/{name}.py: make these keyword-only: {long}"


def test_argument_checks_live_in_bnlab_checks():
    defined = {
        node.name
        for node in ast.walk(_tree(BNLAB / "batch_norm.py"))
        if isinstance(node, ast.FunctionDef)
    }
    assert not {n for n in defined if "check" in n or n in ("_concrete", "_layout")}


def test_the_modules_share_one_call_body_and_nnx_does_not_import_linen(monkeypatch):
    # Both modules' outputs are bnlab.modules.layer_batch_norm's (one body):
    # shifted there, the modules' outputs shift by as much.
    x = jnp.arange(12.0, dtype=jnp.float32).reshape(4, 3)
    linen_bn = bnlab.linen.BatchNorm(use_running_average=False)
    variables = linen_bn.init(jax.random.key(0), x)

    def outputs():
        y_linen, _ = linen_bn.apply(variables, x, mutable=["batch_stats"])
        y_nnx = bnlab.nnx.BatchNorm(3, rngs=nnx.Rngs(0))(x)
        return np.asarray(y_linen), np.asarray(y_nnx)

    plain_linen, plain_nnx = outputs()
    np.testing.assert_allclose(plain_nnx, plain_linen, rtol=1e-6)
    calls = []

    def shifted(name, real):
        def call(*args, **kwargs):
            calls.append(name)
            y, new_stats = real(*args, **kwargs)
            return y + 1000.0, new_stats

        return call

    for module in (bnlab.linen, bnlab.nnx):
        monkeypatch.setattr(
            module,
            "layer_batch_norm",
            shifted(module.__name__, module.layer_batch_norm),
        )
    y_linen, y_nnx = outputs()
    assert sorted(set(calls)) == ["bnlab.linen", "bnlab.nnx"]
    np.testing.assert_allclose(y_linen, plain_linen + 1000.0, rtol=1e-6)
    np.testing.assert_allclose(y_nnx, plain_nnx + 1000.0, rtol=1e-6)
    imports = {
        node.module
        for node in ast.walk(_tree(BNLAB / "nnx.py"))
        if isinstance(node, ast.ImportFrom)
    }
    assert "bnlab.linen" not in imports


def test_collectives_module_holds_collectives_only():
    # jaxpr analysis is a benchmark / test tool (benchmarks.jaxpr_tools)
    public = set(bnlab.collectives.__all__) | {
        n for n in dir(bnlab.collectives) if not n.startswith("_")
    }
    assert not {n for n in public if "jaxpr" in n.lower() or n.startswith("count_")}
    imported = {
        alias.name
        for node in ast.walk(_tree(BNLAB / "collectives.py"))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    } | {
        node.module
        for node in ast.walk(_tree(BNLAB / "collectives.py"))
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not {m for m in imported if "jaxpr" in m or "benchmarks" in m}


def test_the_docs_describe_the_shift_as_the_code_computes_it():
    # sample_shift takes the median of SHIFT_SAMPLES values (more with a
    # mask; test_sample_shift_is_the_median_of_the_sampled_values checks the
    # computation): the rendered docstrings say so.
    doc = " ".join(inspect.getdoc(bnlab.batch_norm).split())
    assert f"median of {stats.SHIFT_SAMPLES} " in doc
    assert f"({stats.SHIFT_SAMPLES_MASKED} with a mask" in doc
    assert f"median of up to {stats.SHIFT_SAMPLES} " in " ".join(
        inspect.getdoc(stats.sample_shift).split()
    )


def test_sample_shift_is_the_median_of_the_sampled_values():
    # 8 rows, one per sample: the shift is their median (an outlier does not
    # move it), not their mean.
    rows = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 1000.0], np.float32)
    x = jnp.asarray(np.stack([rows, -rows], 1))
    shift = stats.sample_shift(x, (0,), None)
    np.testing.assert_array_equal(shift, [[4.5, -4.5]])
    mask = jnp.ones(x.shape, bool).at[7].set(False)
    np.testing.assert_array_equal(stats.sample_shift(x, (0,), mask), [[4.0, -4.0]])


def test_dir_lists_the_public_api_not_imported_modules():
    import bnlab
    import bnlab.parallel

    for module in (bnlab, bnlab.parallel):
        names = set(dir(module))
        assert set(module.__all__) <= names
        assert not names & {"importlib", "jax", "np", "jnp", "lax"}, module
