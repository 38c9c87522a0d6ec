"""The toy zoo: tiny real models (diffusers pipelines, open_clip, a captioner) from fixed seeds.

They run the same loading and inference code paths as full-size models; only the sizes differ.
Tests, CI and `rsx demo` use them because no weights can be downloaded.
"""
