"""The trainer's and producer's import graphs have no cycle: configs sit below everything that reads them."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO


def _import_graph_module():
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# common/ is left out: common.blend imports common.instances inside a function and common.instances imports
# common.blend at module level (issue 15's blends), a cycle for whoever owns those modules to untangle.
@pytest.mark.parametrize("package", ["trainer", "producer"])
def test_no_import_cycle(package):
    graph_module = _import_graph_module()
    graph = graph_module.imports(package)
    assert len(graph) > 3  # the script found the package's modules
    assert graph_module.cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph_module = _import_graph_module()
    graph = {"p": set(), "p.a": {"p.b"}, "p.b": {"p.c", "p"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert graph_module.cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]


def test_the_trainers_modules_read_the_config_module_not_the_cli():
    graph = _import_graph_module().imports("trainer")
    assert "trainer.config" in graph["trainer.loop"] and "trainer.config" in graph["trainer.distributed"]
    readers = sorted(module for module, deps in graph.items() if "trainer.cli" in deps)
    assert readers == ["trainer.__main__"]  # the entry point only
    assert graph["trainer.config"] == set() and graph["trainer.metrics"] == set()
