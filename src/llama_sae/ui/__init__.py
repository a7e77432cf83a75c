"""The browser side: the Gradio chat app (app.py) and the static feature dashboard (dashboard.py)."""
