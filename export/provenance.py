"""Fusion weights carry their provenance: ``diffgap eval`` chooses the ``full`` row's fusion weights
for one set of bridge settings (mode, K, samples, guidance), recorded as ``fusion_settings`` in its
JSON. The weights only mean something for an export whose samplers bridge the same way -- the
runtime's search has one query-side and one gallery-side bridge term, whatever the mode -- so an
export whose settings differ is refused with a one-line message naming both settings and the fix.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffgap.core.errors import UserError
from diffgap.core.names import RUNTIME_SAMPLES


def export_settings(checkpoint: str | Path, steps: int | None, bridge_mode: str | None, guidance_input: bool) -> dict[str, Any]:
    """The bridge settings an export of ``checkpoint`` will run with (the checkpoint's defaults filled in)."""
    from diffgap.checkpoint import read_config

    d = read_config(checkpoint).diffusion
    return {"bridge_mode": bridge_mode or d.bridge_mode, "steps": int(steps or d.sample_steps),
            "samples": RUNTIME_SAMPLES, "guidance_scale": float(d.guidance_scale) if guidance_input else 1.0}


def check_fusion_provenance(eval_json: str | Path, settings: dict[str, Any]) -> None:
    """Raise :class:`UserError` unless ``eval_json``'s fusion weights were chosen for ``settings``."""
    path = Path(eval_json)
    try:
        chosen = json.loads(path.read_text())["fusion_settings"]
    except FileNotFoundError:
        raise UserError(f"--fusion-weights {path} not found; write it with `diffgap eval --json {path}`") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"--fusion-weights {path} does not record the bridge settings its weights were chosen for; "
                        "re-run `diffgap eval` with this diffgap to write them") from None
    diff = [k for k in ("bridge_mode", "steps", "samples", "guidance_scale") if chosen.get(k) != settings[k]]
    if diff:
        want = ", ".join(f"{k}={chosen.get(k)}" for k in diff)
        have = ", ".join(f"{k}={settings[k]}" for k in diff)
        raise UserError(f"--fusion-weights {path} were chosen for {want} but this export bridges with {have}; "
                        "export with the evaluated settings or re-run `diffgap eval` with the export's settings")


def check_export_args(args: Any) -> None:
    """``diffgap export``'s check: refuse ``--fusion-weights`` chosen for other bridge settings."""
    if getattr(args, "fusion_weights", None):
        settings = export_settings(args.checkpoint, args.steps, args.bridge_mode, not args.no_guidance_input)
        check_fusion_provenance(args.fusion_weights, settings)
