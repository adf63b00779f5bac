"""The house rules, read from the import graph (every import statement, inside functions too).

1. The UI never touches torch: webapp/ imports no deep-learning library and no model code; it
   reaches the model through core.engine.
2. The model never touches the database: core/ imports nothing of db/, annotation/ or webapp/.
3. annotation/ reaches the model only through core.engine or a subprocess: only the modules
   that run as a job's or trainer's own process load networks (torch, the model, the face
   analyser); the rest use core.engine or the torch-free parts of core.model (config, recipe,
   templates, prompt).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEEP_LEARNING = ("torch", "torchvision", "transformers", "peft", "accelerate", "bitsandbytes",
                 "safetensors", "onnxruntime", "facenet_pytorch", "facexlib")
TORCH_FREE_MODEL_MODULES = ("core.model.config", "core.model.recipe", "core.model.templates",
                            "core.model.prompt")
NETWORKS = DEEP_LEARNING + ("core.model", "core.faces", "core.prior_net", "core.attributes")
# annotation/ modules that run in a process of their own (a job, the trainer, the CLI's evaluate
# and finetune commands), never inside the web app's process.
SUBPROCESS_MODULES = ("annotation.train", "annotation.evaluate", "annotation.cli_training")


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module a file imports (`from a.b import c` gives a.b and a.b.c)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_name(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def ui_rule(module: str, name: str) -> bool:
    return within(name, DEEP_LEARNING + ("core.model",)) and not within(name, TORCH_FREE_MODEL_MODULES)


def core_rule(module: str, name: str) -> bool:
    return within(name, ("db", "annotation", "webapp"))


def annotation_rule(module: str, name: str) -> bool:
    return (module not in SUBPROCESS_MODULES and within(name, NETWORKS)
            and not within(name, TORCH_FREE_MODEL_MODULES))


def broken(package: str, rule, root: Path = REPO) -> list[str]:
    """'module imports name' for every import in `package` that breaks `rule`."""
    return [f"{module_name(path, root)} imports {name}"
            for path in sorted((root / package).rglob("*.py"))
            for name in sorted(imports_of(path)) if rule(module_name(path, root), name)]


def test_the_ui_never_imports_torch_or_model_code():
    assert broken("webapp", ui_rule) == []


def test_the_model_never_touches_the_database():
    assert broken("core", core_rule) == []


def test_annotation_reaches_networks_only_from_its_subprocess_modules():
    assert broken("annotation", annotation_rule) == []


@pytest.mark.parametrize("package, source, rule, caught", [
    ("webapp", "import torch\n", ui_rule, "torch"),
    ("webapp", "def f():\n    from core.model.modeling import EmoLlama\n", ui_rule, "core.model.modeling"),
    ("core", "from db.session import session_scope\n", core_rule, "db.session"),
    ("annotation", "def f():\n    from core.faces import shared_analyzer\n", annotation_rule, "core.faces"),
])
def test_a_planted_import_breaks_its_rule(tmp_path, package, source, rule, caught):
    """Module-level and function-level imports alike: a file planted in a copy of the layout fails."""
    (tmp_path / package).mkdir()
    (tmp_path / package / "planted.py").write_text(source)
    assert f"{package}.planted imports {caught}" in broken(package, rule, root=tmp_path)
