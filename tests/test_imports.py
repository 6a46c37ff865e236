"""The import rules (docs/ARCHITECTURE.md): which part of nanoseek may import which, checked on the source of
every module, lazy imports inside functions included. A forbidden import or a cycle between parts fails."""

import ast
from pathlib import Path

import nanoseek

ROOT = Path(nanoseek.__file__).parent

# part -> the parts it may import. A part is a subpackage (model, data, ...) or a top-level module (cost, hf, ...).
ALLOWED = {
    "config": set(),
    "runs": set(),  # the checkpoint files of a run
    "runtime": set(),  # device, metrics log
    "report": set(),
    "data": set(),  # knows no model: text, tokenizer, shards, tasks
    "model": {"config"},  # the reference forward: no training, serving, distribution, files or CLI
    "kernels": {"config", "model"},  # faster modules swapped into a built model from outside (kernels.apply)
    "peak": {"kernels"},  # the FLOP/s a device reaches: datasheets, a cached idle measurement (kernels/gemm.py)
    "cost": {"config", "peak"},  # the formulas
    "table": set(),  # tables of marked values, as text or JSON
    "cost_report": {"config", "cost", "peak", "table"},  # the formulas' tables (`nanoseek cost`)
    "plan": {"config", "cost", "peak", "table"},
    "quant": {"config", "model"},  # int8 / int4 weights swapped into a built model from outside (quant.quantize)
    "gguf_io": {"config", "data", "model", "quant"},  # GGUF files in and out (llama.cpp's deepseek2)
    "hf": {"config", "data", "gguf_io", "model", "quant", "runs"},  # model folders (and GGUF files) in and out
    "parallel": {"config", "model", "runs"},  # applied to a plain model from outside
    "infer": {"config", "data", "hf", "kernels", "model", "quant"},  # serving knows no training, RL or distribution
    "train": {"config", "cost", "data", "hf", "kernels", "parallel", "model", "peak", "report", "runs", "runtime"},
    "rl": {"config", "cost", "data", "hf", "infer", "kernels", "model", "peak", "quant", "report", "runs", "runtime",
           "train"},
    "demo": {"config", "cost", "hf", "report", "rl", "runs", "train"},
    "cli": None,  # the top: anything
    "__main__": {"cli"},
    "__init__": {"config", "model"},
}


def part_of(module: str) -> str:
    """nanoseek.model.mla -> model; nanoseek.cost -> cost; nanoseek -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> list[tuple[str, str, str]]:
    """(file, its part, the nanoseek module it imports) for every import in the package."""
    out = []
    for file in sorted(ROOT.rglob("*.py")):
        rel = file.relative_to(ROOT.parent).with_suffix("")
        part = part_of(".".join(rel.parts)) if len(rel.parts) > 1 else "__init__"
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "nanoseek":
                names = [f"nanoseek.{a.name}" for a in node.names]  # from nanoseek import kernels
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            out += [(str(rel), part, n) for n in names if n == "nanoseek" or n.startswith("nanoseek.")]
    return out


def test_every_part_is_listed():
    parts = {part for _, part, _ in imports()} | {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
                                                  if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert parts <= set(ALLOWED), f"parts without import rules: {sorted(parts - set(ALLOWED))}"


def test_no_forbidden_imports():
    bad = [f"{file} ({part}) imports {name}" for file, part, name in imports()
           if part_of(name) != part and ALLOWED[part] is not None and part_of(name) not in ALLOWED[part]]
    assert not bad, "\n".join(bad)


def test_the_rules_have_no_cycle():
    graph = {p: set(a or ()) for p, a in ALLOWED.items()}
    state: dict[str, int] = {}

    def visit(p, path):
        assert state.get(p) != 1, f"cycle: {' -> '.join(path + [p])}"
        if state.get(p) is None:
            state[p] = 1
            for q in graph[p]:
                visit(q, path + [p])
            state[p] = 2
    for p in graph:
        visit(p, [])



def test_the_model_is_plain():
    """nanoseek/model is the reference forward: no timing, no C calls, no environment switches."""
    bad = []
    for file in sorted((ROOT / "model").rglob("*.py")):
        tree = ast.parse(file.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{file.name} imports {n}" for n in names if n.split(".")[0] in ("ctypes", "time", "os")]
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                bad.append(f"{file.name} reads the environment")
    assert not bad, "\n".join(bad)
