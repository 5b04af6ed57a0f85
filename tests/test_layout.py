"""The package's layout: imports flow one way; only backbone.py reaches inside the Hugging Face model and its
tokenizer, only lora.py inside peft's adapted layers."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mtl_utils"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every mtl_utils module `path` imports, at the top or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from . import freezing` names a module; `from .model import X` does not
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, known) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return path[path.index(child):] + [child] if child in path else [node, child]
            if child not in state and (cycle := visit(child, path + [child])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_graph_finder_sees_imports_and_cycles():
    graph = import_graph()
    assert "mtl_utils.model" in graph["mtl_utils.freezing"]
    assert "mtl_utils.offline.cache" in graph["mtl_utils.checkpoint"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_flow_one_way():
    # module-level and function-level imports alike: a lazy import must not hide a cycle
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# what reaches inside the Hugging Face model or its tokenizer, and inside peft's adapted layers
HF_ATTRIBUTES = {"auto_model", "_first_module", "tokenizer"}
HF_PACKAGES = {"transformers", "tokenizers"}
PEFT_ATTRIBUTES = {"lora_A", "lora_B", "lora_alpha", "lora_dropout", "base_layer", "scaling", "use_dora"}
PEFT_PACKAGES = {"peft"}
PEFT_STRINGS = (".lora_", ".base_layer")  # in names of parameters; "lora_" alone is how lora.py finds adapters
# the one module allowed each kind of internals (offline/models.py builds the shipped models from their files)
ALLOWED = {"hugging face": {"backbone.py", "models.py"}, "peft": {"lora.py"}}


def _type_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:`: imports for annotations only, never run."""
    return {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
            and ast.unparse(node.test).endswith("TYPE_CHECKING") for stmt in node.body for inner in ast.walk(stmt)}


def internals(source: str) -> dict[str, list[str]]:
    """What of the Hugging Face and peft internals a module's source touches, by kind: attributes read on
    anything but `self`, imports, and peft's parameter names in strings."""
    found: dict[str, list[str]] = {"hugging face": [], "peft": []}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) != "self":
            for kind, names in (("hugging face", HF_ATTRIBUTES), ("peft", PEFT_ATTRIBUTES)):
                if node.attr in names:
                    found[kind].append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for kind, packages in (("hugging face", HF_PACKAGES), ("peft", PEFT_PACKAGES)):
                found[kind] += [f"line {node.lineno}: import {m}" for m in modules if m.split(".")[0] in packages]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (node.value == "lora_" or any(
                name in node.value for name in PEFT_STRINGS)):
            found["peft"].append(f"line {node.lineno}: {node.value!r}")
    return found


def test_the_internals_finder_sees_what_the_old_rule_let_through():
    source = """
from peft import LoraConfig
from transformers import AutoTokenizer
if TYPE_CHECKING:
    from .model import MultiTaskModel
def pad(model):
    return model.backbone.tokenizer.pad_token_id
def plain(name):
    return name.replace(".base_layer.", ".")
def adapted(module):
    return module.lora_A
"""
    found = internals(source)
    assert [f.split(":")[1].strip() for f in found["hugging face"]] == ["import transformers", ".tokenizer"]
    assert sorted(f.split(":", 1)[1].strip() for f in found["peft"]) == ["'.base_layer.'", ".lora_A", "import peft"]
    tree = ast.parse(source)
    assert sum(id(n) in _type_only(tree) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)) == 1


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_only_backbone_and_lora_reach_the_internals(path):
    for kind, where in internals(path.read_text(encoding="utf-8")).items():
        if path.name not in ALLOWED[kind]:
            assert not where, (f"{path.name} reaches {kind} internals ({'; '.join(where)}): go through "
                               f"mtl_utils.{'backbone' if kind == 'hugging face' else 'lora'}")
