"""The log view the Train and Runs tabs share: app/views/log_view.py's text in a box that follows the newest line."""

from __future__ import annotations

import gradio as gr


def log_box(elem_id: str, lines: int, max_lines: int, label: str | None = None) -> gr.Textbox:
    """A read-only Textbox, not gr.Code: only a Textbox scrolls itself to the newest line as the log grows."""
    return gr.Textbox(
        label=label,
        show_label=label is not None,
        lines=lines,
        max_lines=max_lines,
        autoscroll=True,
        interactive=False,
        elem_id=elem_id,
        elem_classes="lwb-log",  # monospace (app/server.py CSS), as a terminal shows it
    )


# Gradio 6.31's Textbox autoscroll did not follow the timer's updates (seen in Chromium: a 40-line log stayed at its
# top), so the page scrolls every log box to its end whenever its text or height changes; a user who scrolled up
# keeps their place until the next new line.
FOLLOW_NEWEST_JS = """() => setInterval(() => {
  for (const box of document.querySelectorAll('.lwb-log textarea')) {
    const seen = box.value.length + '|' + box.value.slice(-200) + '|' + box.scrollHeight;
    if (box.dataset.lwbSeen !== seen) { box.dataset.lwbSeen = seen; box.scrollTop = box.scrollHeight; }
  }
}, 300)"""
