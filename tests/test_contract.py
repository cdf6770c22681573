"""The recipe contract and the shape of the code: a recipe module dropped into models/recipes/ is
discovered and trained with extra non-optimised networks and a penalty hook, through hooks alone;
imports run one way (launch -> trainer -> models) without cycles; functions stay short."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import gannet.models.recipes
from gannet.trainer.config.loader import load_config
from gannet.trainer.data.stream import open_stream, stream_urls
from gannet.trainer.engine.setup import setup
from tests.conftest import REPO, tiny_overrides


def test_a_dropped_in_recipe_module_is_discovered_and_trains_with_its_hooks_beside_the_built_in_switches(
        plugin_recipe, small_shards, tmp_path):
    assert plugin_recipe not in gannet.models.recipes.RECIPES
    built_in = {"recipe.name": plugin_recipe, "recipe.ema_kimg": 1, "recipe.r1_gamma": 2}  # kept through super()
    cfg = load_config("lsgan_mnist", tiny_overrides(small_shards, tmp_path, **built_in))
    assert cfg.recipe.cr_weight == 10.0 and cfg.recipe.b == 1.0  # typed by the new recipe's Params, inherited fields too
    job = setup(cfg)
    engine = job.engine
    assert list(engine.nets) == ["G", "D", "G_ema", "G_avg"] and set(engine.optimizers) == set(job.schedulers) == {"G", "D"}
    assert not any(p.requires_grad for name in ("G_ema", "G_avg") for p in engine.nets[name].parameters())
    engine.data = open_stream(stream_urls(cfg.data), cfg.data, rank=0, world=1, seed=0)
    params = lambda name: [p.clone() for p in engine.module(name).parameters()]  # noqa: E731

    ema_before = params("G_ema")
    metrics = job.recipe.iteration(engine)
    g1 = params("G")
    assert all(torch.equal(avg, g) for avg, g in zip(params("G_avg"), g1))  # the hook ran after G's step: a copy of G
    job.recipe.iteration(engine)
    g2 = params("G")
    assert any(not torch.equal(a, b) for a, b in zip(g1, g2))
    for avg, a, b in zip(params("G_avg"), g1, g2):  # the uniform average of G's two steps
        assert torch.allclose(avg, (a + b) / 2)
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, params("G_ema")))  # the built-in EMA still runs
    assert metrics["cr"] > 0 and metrics["r1"] > 0  # its own penalty and the built-in R1, both through the D objective
    assert {"G_ema", "G_avg"} <= set(engine.full_weights())  # checkpointed like the optimised networks
    engine.close()


def test_registry_lists_each_bundled_recipe_and_rejects_a_non_recipe():
    assert {"gan", "lsgan", "cgan", "t2i", "cyclegan"} <= set(gannet.models.recipes.discover())
    with pytest.raises(TypeError, match="subclasses gannet.models.recipes.base.Recipe"):
        gannet.models.recipes.register(type("NotARecipe", (), {}))


def gannet_modules() -> dict[str, Path]:
    return {"gannet." + ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
            for top in ("trainer", "models", "launch") for p in sorted((REPO / top).rglob("*.py"))}


def imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The gannet modules `path` imports anywhere in it (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules}
    return found


def test_imports_run_launch_to_trainer_to_models_without_cycles():
    modules = gannet_modules()
    graph = {name: imports(path, modules) for name, path in modules.items()}
    for name, deps in graph.items():
        if name.startswith("gannet.models"):  # networks and recipes see only errors and config types of trainer
            assert {d for d in deps if d.startswith("gannet.trainer")} <= {"gannet.trainer.errors", "gannet.trainer.config.schema"}, name
        if name.startswith(("gannet.models", "gannet.trainer")):
            assert not any(d.startswith("gannet.launch") for d in deps), name
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in graph[name]:
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [name, dep])}"
            if dep not in state:
                visit(dep, path + [name])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])


# Notes that live outside the repository (a user's clone has neither); spelled in two parts so that
# this file does not point there itself.
OUTSIDE = ("DESIGN" ".md", ".." "/shared")


def test_no_function_is_longer_than_80_lines_and_nothing_points_outside_the_repo():
    sources = {**gannet_modules(), **{str(p.relative_to(REPO)): p for p in (REPO / "tests").glob("*.py") if p.name != "test_contract.py"}}
    for name, path in sources.items():
        source = path.read_text()
        assert not any(pointer in source for pointer in OUTSIDE), name
        for node in ast.walk(ast.parse(source)) if name in gannet_modules() else ():
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 80, f"{name}.{node.name} is {node.end_lineno - node.lineno + 1} lines"
