"""Imports run one way: data_pipelines <- core <- model files <- evaluation <- training <- applications.

The layers are read from the source (every ``import``, also inside functions), so a module that
reaches up a layer fails here, naming the file and the import. The layer of each module, or of the
package holding it, is listed below; a new module must be in one (the test fails for an unlisted
module).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lower numbers are lower layers; a module may import its own layer and those below it.
LAYERS = {
    # files -> tensors: shards, samples, image transforms, tokenizers, labelled evaluation data
    0: ["data_pipelines"],
    # the model and what it computes with: towers, losses and their collectives, FLOPs
    1: ["clip_pl.model", "clip_pl.loss", "clip_pl.distributed", "clip_pl.flops"],
    # model files: checkpoints, exports, foreign formats, pretrained weights, loading
    2: ["clip_pl.model_files"],
    # evaluation: metrics, zero-shot tasks, suites, pictures of similarities
    3: ["clip_pl.evaluation"],
    # training: the LightningModule, its optimizer, callbacks, SLURM, sharding
    4: ["clip_pl.training"],
    # applications: the package's API, command-line tools and the training entry point
    5: ["clip_pl", "clip_pl.evaluate", "clip_pl.predict", "clip_pl.export", "clip_pl.convert", "train", "command_line"],
}
# Only the applications compose configs.
CONFIG_LIBRARIES = ("hydra", "omegaconf")


def layer_of(module: str) -> int | None:
    """The layer of a module: that of the longest listed name it is, or is inside."""
    best = None
    for layer, names in LAYERS.items():
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (layer, name)
    return None if best is None else best[0]


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) of every import in a file, relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                # In a package's __init__.py, "." is the package itself.
                package = parts[: len(parts) - node.level + (path.name == "__init__.py")]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                # "from clip_pl import evaluate" imports a module; "from clip_pl.model import CLIP" a name.
                full = f"{base}.{alias.name}" if base else alias.name
                found.append((node.lineno, full if _is_module(full) else base))
    return found


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def project_modules() -> dict[str, Path]:
    modules = {"train": ROOT / "train.py", "command_line": ROOT / "command_line.py"}
    for package in ("clip_pl", "data_pipelines"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def problems_of(module: str, path: Path) -> list[str]:
    """Each import of ``module`` (the file at ``path``) that reaches up a layer, as ``line: what``."""
    mine = layer_of(module)
    if mine is None:
        return [f"{module} is in no layer of tests/test_layers.py"]
    problems = []
    for line, imported in imports_of(path, module):
        theirs = layer_of(imported)
        if theirs is not None and theirs > mine:
            problems.append(f"{line}: {module} (layer {mine}) imports {imported} (layer {theirs})")
        if mine < 4 and imported.split(".")[0] in CONFIG_LIBRARIES:
            problems.append(f"{line}: {module} imports {imported}; only applications compose configs")
    return problems


def test_imports_run_one_way():
    modules = project_modules()
    assert len(modules) > 40
    assert [f"{path.relative_to(ROOT)}:{p}" for module, path in modules.items() for p in problems_of(module, path)] == []


@pytest.mark.parametrize("source, problem", [
    ("from clip_pl.model import CLIP\n", "1: data_pipelines.fake (layer 0) imports clip_pl.model (layer 1)"),
    ("import os\n\ndef f():\n    import clip_pl.training.module\n", "4: data_pipelines.fake (layer 0) imports clip_pl.training.module (layer 4)"),
    ("from clip_pl import evaluate\n", "1: data_pipelines.fake (layer 0) imports clip_pl.evaluate (layer 5)"),
    ("from omegaconf import OmegaConf\n", "1: data_pipelines.fake imports omegaconf; only applications compose configs"),
    ("from . import samples\nfrom .. import clip_pl\n", "2: data_pipelines.fake (layer 0) imports clip_pl (layer 5)"),
])
def test_an_import_up_a_layer_is_found(tmp_path, source, problem):
    path = tmp_path / "fake.py"
    path.write_text(source)
    assert problems_of("data_pipelines.fake", path) == [problem]
