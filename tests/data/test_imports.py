import ast
from pathlib import Path

import nanoseek.data


def test_data_knows_no_model():
    """docs/style.md import rule: nanoseek.data imports no model, training, RL or serving code."""
    root = Path(nanoseek.data.__file__).parent
    for file in root.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("nanoseek.model", "nanoseek.train", "nanoseek.rl", "nanoseek.infer",
                                            "nanoseek.cli", "nanoseek.config")), f"{file.name} imports {name}"
