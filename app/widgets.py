"""Gradio widgets for the form fields of trainer/form.py: one control per RunConfig knob, with its help text."""

from __future__ import annotations

from typing import Any

import gradio as gr

from trainer.form import FormField


def elem_id(path: str) -> str:
    """Stable DOM id of a field's widget, e.g. 'f-training-max_steps' (used by the browser tests)."""
    return "f-" + path.replace(".", "-")


def choice_label(choice: Any) -> tuple[str, Any]:
    """A dropdown entry; True/False among other choices (e.g. 'auto') read as on/off."""
    return ({True: "on", False: "off"}[choice] if isinstance(choice, bool) else str(choice)), choice


def make_widget(field: FormField, value: Any, suggestions: list[str] | None = None) -> gr.components.Component:
    common = {
        "label": field.label,
        "info": field.help,
        "elem_id": elem_id(field.path),
        "value": value,
        "min_width": 240,
    }
    if suggestions is not None:  # a free-text field with useful choices (model ids, dataset files, module groups)
        choices = list(dict.fromkeys([*suggestions, *([value] if value else [])]))
        return gr.Dropdown(choices=choices, allow_custom_value=True, **common)
    if field.kind == "choice":
        return gr.Dropdown(choices=[choice_label(c) for c in field.choices], **common)
    if field.kind == "bool":
        return gr.Checkbox(**common)
    if field.kind == "int":
        return gr.Number(precision=0, **common)
    if field.kind == "float":
        return gr.Number(**common)
    if field.kind == "yaml":
        return gr.Textbox(lines=1, max_lines=6, placeholder="YAML, e.g. [q_proj, v_proj]", **common)
    return gr.Textbox(lines=1, max_lines=8, **common)
