"""Shared test set-up: no hub access, ever."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RSX_LAB", os.path.join(os.path.dirname(__file__), "..", ".pytest-no-default-lab"))
