"""The look-up service (``faceaudit serve``): app.py (FastAPI), config.py, limits.py, page/."""
