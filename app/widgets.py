"""Gradio widgets for the form fields of app/views/form.py: one control per RunConfig knob, with its help text."""

from __future__ import annotations

from typing import Any

import gradio as gr

from app.views.form import ONLY_FOR, FormField


def elem_id(path: str) -> str:
    """Stable DOM id of a field's widget, e.g. 'f-training-max_steps' (used by the browser tests)."""
    return "f-" + path.replace(".", "-")


def choice_label(choice: Any) -> tuple[str, Any]:
    """A dropdown entry; True/False among other choices (e.g. 'auto') read as on/off."""
    return ({True: "on", False: "off"}[choice] if isinstance(choice, bool) else str(choice)), choice


def make_field(
    field: FormField, value: Any, suggestions: list[str] | None = None, visible: bool = True
) -> tuple[gr.components.Component, gr.blocks.Block]:
    """(the field's widget, the block that shows or hides it). A checkbox, or a knob only some methods use, sits
    in a column of its own: a checkbox alone ignores min_width and is squeezed to one word per line in a row."""
    if field.kind != "bool" and field.path not in ONLY_FOR:
        widget = make_widget(field, value, suggestions)
        return widget, widget
    with gr.Column(min_width=240, visible=visible, elem_id=elem_id(field.path) + "-box") as box:
        widget = make_widget(field, value, suggestions)
    return widget, box


def make_widget(field: FormField, value: Any, suggestions: list[str] | None = None) -> gr.components.Component:
    common = {
        "label": field.label,
        "info": field.info,
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
