"""A repository script (launch/*.py, bench/*.py, scripts/*.py) loaded as a module, for in-process tests."""

import importlib.util

from freeloc_dist.config import REPO_ROOT


def load_script(path: str):
    """The script at REPO_ROOT / path, executed as a fresh module (its main returns the exit code)."""
    name = "_script_" + path.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
