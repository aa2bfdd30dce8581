"""Every Ray process a run starts is defined in a role module (src/distillation/roles/), so `ls` shows
them and a reader finds which process runs what. Checked on the source, as a reviewer would."""

import ast
from pathlib import Path

import distillation

PACKAGE = Path(distillation.__file__).parent
ROLES = PACKAGE / "roles"
# Calls that define a Ray process or name an actor: a remote function or actor class, a Serve
# deployment, a named actor, a Ray Data stage run by actors.
PROCESS_CALLS = {"remote", "deployment", "map_batches", "flat_map"}


def _call_name(node: ast.AST) -> str:
    func = node.func if isinstance(node, ast.Call) else node
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _process_sites(tree: ast.AST):
    """(line, what) for every place in `tree` that defines a Ray process or names an actor."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for decorator in node.decorator_list:
                if _call_name(decorator) in ("remote", "deployment"):
                    yield node.lineno, f"@{_call_name(decorator)} {node.name}"
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        if name in PROCESS_CALLS and isinstance(node.func, ast.Attribute) and (
                name != "remote" or _call_name(node.func.value) == "ray" or getattr(node.func.value, "id", "") == "ray"):
            yield node.lineno, f"{name}(...)"
        if name == "options" and any(k.arg == "name" for k in node.keywords):
            yield node.lineno, "a named actor"
        if name == "TorchTrainer":  # Ray Train's worker processes
            yield node.lineno, "TorchTrainer(...)"


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "_configs" not in p.parts)


def test_every_ray_process_and_named_actor_is_defined_in_a_role_module():
    outside = [f"{path.relative_to(PACKAGE)}:{line} {what}" for path in _modules() if ROLES not in path.parents
               for line, what in _process_sites(ast.parse(path.read_text()))]
    assert outside == [], "define these in src/distillation/roles/: " + "; ".join(outside)


def test_the_check_finds_ray_processes():
    """The scan above must be able to fail: each kind of definition it guards against is found."""
    source = '''
@ray.remote(num_cpus=0)
class Actor: ...
@serve.deployment(name="x")
class Replica: ...
task = ray.remote(max_calls=1)(f)
handle = Actor.options(name="run-actor").remote()
trainer = TorchTrainer(loop, scaling_config=scaling)
rows = dataset.map_batches(Stage, compute=ray.data.ActorPoolStrategy(size=1))
'''
    found = [what for _, what in _process_sites(ast.parse(source))]
    assert found.count("@remote Actor") == 1 and "@deployment Replica" in found
    assert "remote(...)" in found and "a named actor" in found and "map_batches(...)" in found
    assert "TorchTrainer(...)" in found
    assert [what for _, what in _process_sites(ast.parse("ref = actor.method.remote(1)"))] == []


def test_every_role_module_says_which_process_it_is_and_defines_it():
    for path in sorted(ROLES.glob("*.py")):
        if path.name == "__init__.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert doc.startswith("Role: "), f"{path.name}: its docstring must start by naming its process"
        assert any(where for _, where in _process_sites(ast.parse(path.read_text()))), f"{path.name} defines no process"
