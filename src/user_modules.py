"""The config's `imports:`: the user's own modules, imported so their decorators register components."""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path

from src.errors import ConfigError


def import_user_modules(modules: list[str]) -> None:
    """Import the config's `imports:` so their decorators register components before anything is built."""
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    for name in modules:
        if not name or "/" in name or "\\" in name or name.endswith(".py"):
            raise ConfigError(
                f"imports: '{name}' is not a module name; write it the way Python imports it, e.g. mypkg.models"
            )
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is None or not (name == err.name or name.startswith(err.name + ".")):
                raise _import_error(name, err) from None
            raise ConfigError(
                f"imports: no module named '{err.name}' (searched the Python path, which includes {Path.cwd()}); "
                "run from the folder that holds it, add that folder to PYTHONPATH, or pip install it"
            ) from None
        except Exception as err:
            raise _import_error(name, err) from None


def _import_error(name: str, err: Exception) -> ConfigError:
    """The user module's own error, pointing at its file and line (not at importlib's frames)."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith("<")]
    if isinstance(err, SyntaxError):  # its message already names the file and line
        where = ""
    elif frames:
        where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})"
    else:
        where = ""
    return ConfigError(f"imports: module '{name}' failed to import: {type(err).__name__}: {err}{where}")
