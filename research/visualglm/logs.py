"""Where the libraries' logs go, set up when `visualglm` is imported, without importing MindSpore or MindFormers
(so that `--help` stays instant):

* MindSpore's C++ log shows errors only unless GLOG_v is set.
* MindFormers' log folder goes to a cache folder (LOCAL_DEFAULT_PATH), not `./output/log` wherever a script runs;
  so does MindSpore's report of a failed graph compile (MS_OM_PATH; it used to write `./rank_0/om/`; MindSpore
  reads it when imported, so import visualglm first).
* MindFormers' console log goes to stderr (it writes to stdout, where the answers go) and shows errors only;
  `--verbose` (or VISUALGLM_LOG_LEVEL=INFO) shows its warnings and info lines too.
* `import visualglm` registers the MindFormers pipeline task: at once when MindFormers is already imported,
  else right after MindFormers is first imported.

The last two hook the import of the MindFormers modules concerned (`_AfterImport`), because MindFormers
creates its console handler on first use, on the stdout of that moment, and logs while it is being imported.
"""
import contextlib
import importlib
import importlib.abc
import logging
import os
import sys

LEVEL_ENV = "VISUALGLM_LOG_LEVEL"
DEFAULT_LEVEL = "ERROR"
VERBOSE_LEVEL = "INFO"
_LOGGER_MODULE = "mindformers.tools.logger"
_PIPELINE_MODULE = "visualglm.pipeline"


def set_environment():
    """Defaults for the variables MindSpore and MindFormers read at import; the user's own values win."""
    os.environ.setdefault("GLOG_v", "3")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.environ.setdefault("LOCAL_DEFAULT_PATH", os.path.join(cache, "visualglm", "mindformers"))
    os.environ.setdefault("MS_OM_PATH", os.path.join(cache, "visualglm", "mindspore"))


def level():
    """The console level of the MindFormers log: $VISUALGLM_LOG_LEVEL, else errors only."""
    name = os.environ.get(LEVEL_ENV, DEFAULT_LEVEL).upper()
    return logging.getLevelName(name) if isinstance(logging.getLevelName(name), int) else logging.ERROR


def set_verbose(verbose=True):
    """Show MindFormers' warnings and info lines (on stderr) from now on, or only its errors."""
    os.environ[LEVEL_ENV] = VERBOSE_LEVEL if verbose else DEFAULT_LEVEL
    if _LOGGER_MODULE in sys.modules:
        _configure_mindformers_logger(sys.modules[_LOGGER_MODULE])


def _configure_mindformers_logger(module):
    """Create MindFormers' logger now (its console handler then binds stderr) and set the console level."""
    with contextlib.redirect_stdout(sys.stderr):
        mf_logger = module.get_logger()
    for handler in mf_logger.handlers:
        if type(handler) is module.LimitedRepeatHandler:   # the console handler (file handlers subclass others)
            if handler.stream is sys.__stdout__ or handler.stream is sys.stdout:
                handler.setStream(sys.stderr)
            handler.setLevel(level())


def _register_pipeline():
    importlib.import_module(_PIPELINE_MODULE)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a function right after a module has been executed, the first time it is imported."""

    def __init__(self, actions):
        self.actions = dict(actions)

    def find_spec(self, name, path, target=None):
        if name not in self.actions:
            return None
        action = self.actions.pop(name)
        if not self.actions:
            sys.meta_path.remove(self)
        spec = _find_with_others(self, name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            action(module)
        spec.loader.exec_module = exec_module
        return spec


def _find_with_others(finder, name, path, target):
    for other in sys.meta_path:
        if other is finder or not hasattr(other, "find_spec"):
            continue
        spec = other.find_spec(name, path, target)
        if spec is not None:
            return spec
    return None


def install():
    """Set the environment and arrange the MindFormers logger and the pipeline registration (see above)."""
    set_environment()
    actions = {}
    if _LOGGER_MODULE in sys.modules:
        _configure_mindformers_logger(sys.modules[_LOGGER_MODULE])
    else:
        actions[_LOGGER_MODULE] = _configure_mindformers_logger
    if "mindformers" in sys.modules:
        _register_pipeline()
    else:
        actions["mindformers"] = lambda module: _register_pipeline()
    if actions and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(actions))
