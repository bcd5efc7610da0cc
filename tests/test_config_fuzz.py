"""Random mutations of a valid config are either accepted or refused with a one-line ConfigError.

The loader and the preflight check sit between a user's typing and a run: whatever goes in (a key
renamed, dropped or retyped, a random value, a garbled override), what comes out must be a config
or a `ConfigError` with one line that names the culprit, never a KeyError or TypeError from deep
inside. Hypothesis drives the mutations; everything runs in-process, without torch training.
"""

from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from src import register_builtins
from src.config import load_config
from src.engine.build import preflight
from src.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DUMMY = ROOT / "config" / "dummy.yaml"

register_builtins()

# The fully merged dummy config as plain data: the valid starting point of every mutation.
VALID: dict[str, Any] = OmegaConf.to_container(load_config(DUMMY))  # type: ignore[assignment]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested mapping, inner nodes included."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append((*prefix, key))
            out += _paths(value, (*prefix, key))
    return out


PATHS = _paths(VALID)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.sampled_from([2**31, 2**32, 2**63 - 1, 2**63, 2**70, -(2**63) - 1]),  # edges of 32 and 64 bits
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["auto", "cpu", "cuda", "bf16", "16", "fsdp", "ddp", "max", "0,1", "SimpleCNN", "AdamW"]),
    st.sampled_from(["${batch}", "${oops", "${nowhere.key}", "${oc.env:NO_SUCH_VAR_XYZ}", "\\${x}"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
# Key names: typos of real ones, the real ones, and noise.
names = st.one_of(
    st.sampled_from(sorted({p[-1] for p in PATHS})),
    st.text(min_size=1, max_size=10),
    st.sampled_from(["__base__", "__import__", "name", "batchh", "lr ", "Epoch"]),
)


def _parent(cfg: dict, path: tuple) -> dict | None:
    node: Any = cfg
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, dict) else None


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    cfg = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        path = draw(st.sampled_from(PATHS))
        parent = _parent(cfg, path)
        if parent is None or path[-1] not in parent:
            continue
        action = draw(st.sampled_from(["drop", "rename", "retype", "add"]))
        if action == "drop":
            del parent[path[-1]]
        elif action == "rename":
            parent[draw(names)] = parent.pop(path[-1])
        elif action == "retype":
            parent[path[-1]] = draw(values)
        else:
            parent[draw(names)] = draw(values)
    return cfg


def _check(load) -> None:
    """Run `load`; a refusal must be a ConfigError with one short line."""
    try:
        cfg = load()
        preflight(cfg)
    except ConfigError as err:
        text = str(err)
        assert text and "\n" not in text, f"multi-line message: {text!r}"
        assert "Traceback" not in text


FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


@FUZZ
@given(cfg=mutated())
def test_mutated_config_files_are_accepted_or_refused_in_one_line(cfg, workdir):
    path = workdir / "exp.yaml"
    try:
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    except yaml.YAMLError:  # not representable as YAML at all: nothing a user could write
        return
    _check(lambda: load_config(path))


overrides = st.lists(
    st.one_of(
        st.builds(
            lambda k, v: f"{'.'.join(k)}={v}",
            st.sampled_from(PATHS),
            st.one_of(
                st.text(max_size=10),
                st.sampled_from(
                    ["[1,2", "{a: 1}", "null", "1e-3", "-5", "0", "${epoch}", "${x", "!!binary aGk="]
                ),
            ),
        ),
        st.text(max_size=20),
    ),
    max_size=4,
)


@FUZZ
@given(args=overrides)
def test_garbled_command_line_overrides_are_accepted_or_refused_in_one_line(args):
    _check(lambda: load_config(DUMMY, args))


@pytest.mark.parametrize(
    "override",
    [
        "model={}",
        "dataset=[1, 2]",
        "optimizer.name=null",
        "lr_scheduler.name=3",
        "transform.train=5",
        "transform.train=[{size: 3}]",
        "imports=7",
        "gpu.use={a: 1}",
        "evaluation.metrics={a: 1}",
        "training.early_stopping=3",
        "epoch=.inf",
        "optimizer.lr=.nan",
        "seed=1e400",
        "tag=${nowhere}",
        "model.width=${oc.env:NO_SUCH_VAR_XYZ}",
        "tag=!!python/name:os.system",
        "dataset.root=x",
        "model.name=",
    ],
)
def test_known_awkward_values(override):
    _check(lambda: load_config(DUMMY, [override]))


@pytest.mark.parametrize(
    "override, words",
    [
        ("training.stop_signals=[SIGKILL]", "cannot be caught"),
        ("training.stop_signals=[SIGSTOP]", "cannot be caught"),
        ("training.stop_signals=[SIG_IGN]", "is not a signal"),
        ("training.stop_signals=[TERM]", "is not a signal"),
        (f"seed={2**70}", "'seed' must be >= 0 and <= 4294967295"),
        ("seed=-1", "'seed' must be >= 0"),
        (f"epoch={10**20}", "'epoch' must be >= 1 and <= 1000000"),
        (f"batch={10**20}", "'batch' is too large"),
        (f"checkpoint.save_every_n_steps={2**63}", "does not fit in 64 bits"),
        ("model={name: SimpleCNN, a: &x [*x]}", "recursive YAML anchor in override"),
        ("training.privacy.noise_multiplier=2", "training.privacy.enabled is not true"),
        ("training.privacy.secure_mode=true", "training.privacy.enabled is not true"),
        ("run_dir=/tmp/elsewhere", "run_dir cannot be set on the command line"),
    ],
)
def test_values_no_run_could_use_are_refused(override, words):
    """Each of these once crashed deep inside torch or signal, recursed without end, or was accepted."""
    with pytest.raises(ConfigError, match=re.escape(words)) as err:
        preflight(load_config(DUMMY, [override]))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        ("{}\n", "is empty"),
        (
            "model: &m {name: SimpleCNN, self: *m}\n",
            "'model.self' refers to a mapping or list that contains it",
        ),
        ("a: &l [1, *l]\n", "'a.1' refers to"),
    ],
)
def test_files_no_run_could_use_are_refused(workdir, text, words):
    path = workdir / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(words)) as err:
        load_config(path)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="is a directory, not a YAML file"):
        load_config(workdir)
