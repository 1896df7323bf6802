"""The model card (README.md) written beside every exported checkpoint.

It tells the next user, who may never have heard of layerprune, what was removed, why, and how to
load the result with plain transformers.
"""

from __future__ import annotations

from typing import Any


def render_model_card(record: dict[str, Any]) -> str:
    removed = record.get("removed_layers", [])
    replaced = record.get("replaced_blocks", [])
    lines = [
        "---",
        "library_name: transformers",
        "tags: [layerprune, depth-pruning]",
        "---",
        f"# {record.get('source_model', 'model')} — depth-pruned with layerprune",
        "",
        f"- Source model: `{record.get('source_model')}`",
        f"- Decoder layers: {record.get('original_num_layers')} → {record.get('num_layers')}",
        f"- Parameters: {record.get('original_parameters', 0):,} → {record.get('parameters', 0):,}",
        f"- Removed layers (indices in the original model): {removed if removed else 'none'}",
        f"- Why: {record.get('reason', 'layers named by the user')}",
    ]
    for block in replaced:
        lines.append(
            f"- Layers {block['start']}..{block['end'] - 1} of the original model were replaced by one "
            f"trained `{block['kind']}` module. {block.get('note', '')}".rstrip()
        )
    for step in record.get("healing", []):
        lines.append(f"- Healed with `{step.get('method')}`: {step.get('summary', '')}".rstrip(": "))
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(\"PATH\")",
        "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")",
        "```",
        "",
        "This is a standard checkpoint: no layerprune import and no remote code are needed.",
        f"Provenance (recipe, versions, date) is in `layerprune.json`. Written by layerprune {record.get('versions', {}).get('layerprune', '')}.",
        "",
    ]
    return "\n".join(lines)
