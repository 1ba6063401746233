"""uadlab app: load images, train heads, compare heatmaps side by side, annotate and review, use the Hub.

The entry point a Hugging Face Space runs (``python app.py``, ``--port``, ``--share``); the screens live in
``uadlab/ui/`` (one module per tab). Offline, the demo data, EfficientNet-Lite0 and the quick preset give a
heatmap in a few clicks.
"""
from uadlab.ui import build_app, main, serve  # noqa: F401  (build_app/serve: for gradio's reload and tests)

if __name__ == "__main__":
    main()
