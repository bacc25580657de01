"""Helpers of tests/test_container_images.py: a podman that owns its storage and configuration
(`engine.py`) and a Debian base image made without a registry (`base_image.py`)."""
