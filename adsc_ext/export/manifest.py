"""``adsc_manifest.json``: what an exported folder holds and how its graphs are fed.

The exporter writes it last (a folder without it is not a finished export); the runner and the
TensorRT build read it. It records the schedule, grid, image token id, model dims, dtype, opset,
the attention and compaction lowering, the versions used, and every graph's inputs and outputs
with their dims and meaning (taken from the saved graphs themselves).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

__all__ = ["MANIFEST_NAME", "FORMAT", "FORMAT_VERSION", "GRAPH_FILES", "ExportError", "load_manifest",
           "write_manifest", "stage_dim", "past_dim"]

MANIFEST_NAME = "adsc_manifest.json"
FORMAT = "adsc-llava-onnx"
FORMAT_VERSION = 1
#: graph name -> file, in the order they are exported and run
GRAPH_FILES = {"vision": "vision.onnx", "embed": "embed.onnx", "prefill": "prefill.onnx", "decode": "decode.onnx"}
#: keys every manifest has (checked on load)
REQUIRED = ("format", "format_version", "schedule", "grid", "image_token_id", "tokens_per_image", "stages",
            "model", "dtype", "opset", "attention", "compaction", "padding_side", "versions", "graphs")


class ExportError(ValueError):
    """An export that cannot be made, or a folder that is not a usable export."""


def stage_dim(stage: int) -> str:
    """The prefill dim name of a stage's sequence length (all its layers' K/V share it)."""
    return f"seq_stage{stage}"


def past_dim(stage: int) -> str:
    """The decode dim name of a stage's cached length (``past_key_values.{layer}.*`` dim 2)."""
    return f"past_seq_stage{stage}"


def write_manifest(folder: Path, manifest: Dict[str, Any]) -> Path:
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def load_manifest(folder, schedule: Optional[str] = None) -> Dict[str, Any]:
    """Read and check a folder's manifest. ``schedule``: the schedule the caller expects (text);
    a folder exported with another one is refused. Raises :class:`ExportError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such export folder")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(f"{folder} has no {MANIFEST_NAME}: not an adsc export folder (or an unfinished export)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: not a readable JSON manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: not an adsc export manifest (format {manifest.get('format')!r}, "
                          f"expected {FORMAT!r})" if isinstance(manifest, dict) else f"{path}: not a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: manifest format version {manifest.get('format_version')!r}; this adsc_ext "
                          f"reads version {FORMAT_VERSION}: re-export the model")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ExportError(f"{path}: incomplete manifest, missing {', '.join(missing)}")
    if schedule is not None and str(schedule) != manifest["schedule"]:
        raise ExportError(f"{folder} was exported with schedule '{manifest['schedule']}', not '{schedule}'")
    for name, file in GRAPH_FILES.items():
        g = manifest["graphs"].get(name)
        if not isinstance(g, dict) or g.get("file") != file:
            raise ExportError(f"{path}: the manifest does not describe the {name} graph ({file})")
        if not (folder / file).is_file():
            raise ExportError(f"{folder}: {file} is missing (the manifest lists it)")
    return manifest
