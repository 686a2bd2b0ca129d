"""View-models of the pages: what each tab shows, computed from the run dirs and the config in pure Python (no
Gradio), so the tabs only lay out and wire them and tests check them without a browser."""
