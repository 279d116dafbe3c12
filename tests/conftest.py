"""Shared fixtures: tiny seeded models built from configs (never downloaded)."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

from tests import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny SD-architecture pipeline saved with save_pretrained (DDIM scheduler config)."""
    d = tmp_path_factory.mktemp("tiny-sd")
    tiny.build_sd_pipeline().save_pretrained(str(d), safe_serialization=True)
    return str(d)


@pytest.fixture(scope="session")
def tiny_flow_dir(tmp_path_factory):
    """The same architecture with a flow-matching scheduler config."""
    d = tmp_path_factory.mktemp("tiny-flow")
    tiny.build_sd_pipeline(flow=True).save_pretrained(str(d), safe_serialization=True)
    return str(d)
