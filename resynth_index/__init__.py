"""rsx: attribute AI-generated images to their source generator by resynthesis."""

__version__ = "0.1.0"
