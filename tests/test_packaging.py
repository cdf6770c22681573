"""Packaging hygiene: every internal of another library that gannet relies on exists in the installed
version (an upgrade that removes one fails here, by name) and its package has an upper bound; every
package gannet or its tests import is declared, and every declared one is used; `gannet --version`.

Internals are private names (`_x`), modules outside a library's documented API, attributes of objects
a library builds (DeepSpeed's ZeRO buffers), and file formats gannet reads itself (W&B's log).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
from importlib.metadata import packages_distributions, version
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gannet.trainer.cli import main as cli_main
from tests.conftest import REPO

SOURCES = ("trainer", "models", "launch", "gannet", "configs")


def attribute(path: str) -> object:
    """The object at a dotted path: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def assigned_in(module: str, attr: str) -> bool:
    """Whether `module`'s source sets `<something>.attr` (an instance attribute its classes create)."""
    return re.search(rf"\.{attr}\s*(:[^=\n]*)?=[^=]", inspect.getsource(importlib.import_module(module))) is not None


def wandb_history_fields() -> bool:
    """What gannet.trainer.tracking.wandb_files reads from each record of W&B's transaction log."""
    from wandb.proto import wandb_internal_pb2 as pb

    item = pb.HistoryItem.DESCRIPTOR.fields_by_name
    return "history" in pb.Record.DESCRIPTOR.fields_by_name and {"key", "nested_key", "value_json"} <= set(item)


# (distribution, the internal as gannet's code names it, the check that it exists in the installed version)
INTERNALS = [
    ("torch", "torch._dynamo.utils.counters", lambda: isinstance(attribute("torch._dynamo.utils.counters"), dict)),
    ("torch", "torch.nn.modules.instancenorm._InstanceNorm", lambda: inspect.isclass(attribute("torch.nn.modules.instancenorm._InstanceNorm"))),
    ("accelerate", "accelerate.state.AcceleratorState._shared_state", lambda: hasattr(attribute("accelerate.state.AcceleratorState"), "_shared_state")),
    ("accelerate", "accelerate.state.AcceleratorState._reset_state", lambda: callable(attribute("accelerate.state.AcceleratorState._reset_state"))),
    ("deepspeed", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", lambda: attribute("deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler")),
    ("deepspeed", "deepspeed.runtime.fp16.loss_scaler.LossScaler", lambda: attribute("deepspeed.runtime.fp16.loss_scaler.LossScaler")),
    ("deepspeed", "deepspeed.runtime.zero.config.ZeroStageEnum", lambda: attribute("deepspeed.runtime.zero.config.ZeroStageEnum")),
    ("deepspeed", "deepspeed.utils.tensor_fragment.fragment_address", lambda: attribute("deepspeed.utils.tensor_fragment.fragment_address")),
    *[("deepspeed", f"DeepSpeedEngine.{a}", lambda a=a: assigned_in("deepspeed.runtime.engine", a))
      for a in ("_support_torch_style_backward", "_running_engine_backward_lock", "_running_engine_backward_count",
                "_running_engine_backward", "checkpoint_engine")],
    ("deepspeed", "DeepSpeedEngine.was_step_applied", lambda: callable(attribute("deepspeed.runtime.engine.DeepSpeedEngine.was_step_applied"))),
    *[("deepspeed", f"ZeRO-1/2 optimizer.{a}", lambda a=a: assigned_in("deepspeed.runtime.zero.stage_1_and_2", a))
      for a in ("averaged_gradients", "overflow", "grads_in_partition", "single_partition_of_fp32_groups", "_zero_padding")],
    *[("deepspeed", f"ZeRO-3 optimizer.{a}", lambda a=a: assigned_in("deepspeed.runtime.zero.stage3", a))
      for a in ("averaged_gradients", "overflow", "grad_partitions_flat_buffer", "fp32_partitioned_groups_flat")],
    ("deepspeed", "ZeRO-3 parameter.ds_tensor", lambda: assigned_in("deepspeed.runtime.zero.partition_parameters", "ds_tensor")),
    ("webdataset", "webdataset.tariterators.group_by_keys", lambda: callable(attribute("webdataset.tariterators.group_by_keys"))),
    ("webdataset", "webdataset.tariterators.tar_file_iterator", lambda: callable(attribute("webdataset.tariterators.tar_file_iterator"))),
    ("wandb", "wandb.proto.wandb_internal_pb2.Record.history", wandb_history_fields),
    ("submitit", "submitit.slurm.slurm._make_sbatch_string", lambda: callable(attribute("submitit.slurm.slurm._make_sbatch_string"))),
    ("submitit", "submitit.SlurmExecutor._submitit_command_str", lambda: hasattr(attribute("submitit.SlurmExecutor"), "_submitit_command_str")),
]


@pytest.mark.parametrize("internal", INTERNALS, ids=[name for _, name, _ in INTERNALS])
def test_each_internal_gannet_uses_exists_in_the_installed_version(internal):
    dist, name, check = internal
    try:
        present = check()
    except (ImportError, AttributeError) as exc:
        present, why = False, f"{type(exc).__name__}: {exc}"
    else:
        why = "not found"
    assert present, f"{dist} {version(dist)} no longer has {name} ({why}), which gannet uses: adapt gannet, or keep the bound"


def requirements(group: str | None = None) -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return {canonicalize_name(req.name): req for req in map(Requirement, listed)}


def test_packages_used_through_internals_have_an_upper_bound_that_admits_the_installed_version():
    declared = requirements()
    for dist in sorted({dist for dist, _, _ in INTERNALS}):
        req = declared[canonicalize_name(dist)]
        assert any(spec.operator in ("<", "<=", "~=", "==") for spec in req.specifier), f"{req}: no upper bound"
        assert req.specifier.contains(version(dist), prereleases=True), f"{req} excludes the installed {version(dist)}"


def test_the_internals_list_names_every_private_name_the_code_reaches_and_nothing_stale():
    """A private name (`_x`) of a library, imported or reached through an imported name, must be listed
    above; each listed name must still occur in gannet's code."""
    listed = {name for _, name, _ in INTERNALS}
    found = {name for path in source_files(SOURCES) for name in private_names(path)}
    assert found <= listed, f"internals used but not listed in INTERNALS: {sorted(found - listed)}"
    code = "\n".join(path.read_text() for path in source_files(SOURCES))
    for name in listed:
        assert name.rsplit(".", 1)[-1] in code, f"{name} is listed but gannet no longer uses it"


def source_files(folders: tuple[str, ...]) -> list[Path]:
    return [p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))]


def third_party(module: str) -> bool:
    top = module.split(".")[0]
    return top not in sys.stdlib_module_names and top not in ("gannet", "tests", "__future__")


def private(part: str) -> bool:
    """`_x` is a library's internal; `__version__` and other dunders are public."""
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def private_names(path: Path) -> set[str]:
    """Dotted names of library internals `path` reaches: imports with a private part, and private
    attributes of names it imported from a library (`nn.modules.instancenorm._InstanceNorm`)."""
    bound, found = {}, set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound.update({(a.asname or a.name.split(".")[0]): (a.name if a.asname else a.name.split(".")[0])
                          for a in node.names if third_party(a.name)})
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and third_party(node.module):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                bound[a.asname or a.name] = full
                if any(private(part) for part in full.split(".")):
                    found.add(full)
    for node in ast.walk(tree):
        chain = []
        while isinstance(node, ast.Attribute):
            chain.insert(0, node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in bound and any(private(p) for p in chain):
            cut = next(i for i, p in enumerate(chain) if private(p)) + 1
            found.add(".".join([bound[node.id], *chain[:cut]]))
    return found


def imported_distributions(folders: tuple[str, ...]) -> dict[str, str]:
    """Distribution name -> a file that imports it (or finds it with importlib.util.find_spec)."""
    owners = packages_distributions()
    out = {}
    for path in source_files(folders):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "find_spec" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                modules = [node.args[0].value]
            else:
                continue
            for module in filter(third_party, modules):
                top = module.split(".")[0]
                assert top in owners, f"{path.relative_to(REPO)} imports {top}, which no installed distribution provides"
                for dist in owners[top]:
                    out.setdefault(canonicalize_name(dist), str(path.relative_to(REPO)))
    return out


def test_every_imported_package_is_declared_and_every_declared_one_is_used():
    runtime, tests = requirements(), requirements("test")
    extras = {dist for group in ("export",) for dist in requirements(group)}  # optional features, imported where used
    used = imported_distributions(SOURCES)
    missing = {dist: where for dist, where in used.items() if dist not in runtime and dist not in extras}
    assert not missing, f"imported by gannet but not in pyproject's dependencies or an extra: {missing}"
    unused = set(runtime) - set(used)
    assert not unused, f"declared in pyproject's dependencies but never imported by gannet: {sorted(unused)}"
    used_by_tests = imported_distributions(("tests",))
    missing = {dist: where for dist, where in used_by_tests.items() if dist not in runtime and dist not in tests}
    assert not missing, f"imported by the tests but declared neither as a dependency nor in the test extra: {missing}"


def test_version_flag_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"gannet {version('gannet')}"


def test_license_is_the_declared_apache_2():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0" in (REPO / "LICENSE").read_text()
