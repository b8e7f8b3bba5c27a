"""The errors adsc_ext raises for what its user can fix, under one base class: :class:`AdscError`.

Everything here means "the input, the model, the folder or the arguments you gave cannot be used,
and the message says what was expected and what was given". The command line (``adsc``) reports
an :class:`AdscError` as one line with exit status 2; any other exception is a bug in adsc_ext (or
in a library under it) and surfaces as a traceback.

Each class also derives from the built-in exception its callers caught before this base existed
(``ValueError``, ``TypeError`` or ``ImportError``), so ``except ValueError`` around an adsc_ext call
keeps working. Pure Python: importable without torch.
"""

from __future__ import annotations

__all__ = [
    "AdscError",
    "AdscInputError",
    "AdscModelError",
    "ScheduleError",
    "KVCapacityError",
    "ExportError",
    "ModelSpecError",
    "BenchError",
    "CliError",
    "TensorRTUnavailable",
    "TensorRTBuildError",
    "EngineInputError",
]


class AdscError(Exception):
    """Base of every error adsc_ext raises for something its user can fix."""


class AdscInputError(AdscError, ValueError):
    """Input adsc_ext cannot run: a request or batch (broken or split images, images that do not
    match their tokens, token ids out of range), or an argument out of its range."""


#: The engine's name for a bad request (the one request check raises :class:`AdscInputError`).
EngineInputError = AdscInputError


class AdscModelError(AdscError, TypeError):
    """A model adsc_ext does not support (not a registered architecture, or a shape ADSC needs
    is missing: a LLaMA-family decoder, whole-grid images...)."""


class ScheduleError(AdscError, ValueError):
    """A schedule that is malformed or does not fit the model it is applied to."""


class KVCapacityError(AdscError, ValueError):
    """A request does not fit into the KV pool (now, or ever)."""


class ExportError(AdscError, ValueError):
    """An export that cannot be made, or a folder that is not a usable export."""


class ModelSpecError(AdscError, ValueError):
    """A model configuration ``adsc plan`` cannot describe: unknown preset, unreadable or
    incomplete config.json."""


class BenchError(AdscError, ValueError):
    """A benchmark that cannot run as asked."""


class CliError(AdscError):
    """A command-line usage error (bad or missing arguments)."""


class TensorRTUnavailable(AdscError, ImportError):
    """``tensorrt`` cannot be imported; the message says what to install."""


class TensorRTBuildError(AdscError, ValueError):
    """A folder, manifest, limit or TensorRT build that cannot give an engine."""
