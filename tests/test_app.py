"""The Gradio app: builds without side effects and serves generation through its API."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    import app

    demo = app.build_demo()
    port = free_port()
    demo.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                                                   quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_import_has_no_side_effects():
    """Importing the app and the engine loads no model library, detects no device, opens no socket."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, socket\n"
        "events = []\n"
        "sys.addaudithook(lambda e, a: events.append(e) if e in ('socket.connect', 'socket.getaddrinfo') else None)\n"
        "import app, studio, studio.engine, studio.session, tabs.generate\n"
        "print('diffusers' in sys.modules, 'transformers' in sys.modules, len(events))\n"
        "s = studio.session.SessionManager()\n"
        "print(s._device is None, s.loaded())\n"
    )
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "False False 0"
    assert lines[-1] == "True []"


def test_generate_through_api(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    names = client.view_api(return_format="dict")["named_endpoints"]
    assert "/generate" in names and "/stop" in names
    image, info, files = client.predict("shapesworld", "a small blue square at the top on a white background", "",
                                        "default", 3, 5.0, 7, 0, 0, api_name="/generate")
    img = np.asarray(Image.open(image))
    assert img.shape == (64, 64, 3)
    assert "seed 7" in info and "3 steps" in info and "NFE" in info
    png = files[0] if isinstance(files, list) else files
    png = png if isinstance(png, str) else png.get("path", png)
    assert "parameters" in Image.open(png).info


def test_empty_prompt_is_a_clear_error(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="prompt"):
        client.predict("shapesworld", "   ", "", "default", 3, 5.0, 0, 0, 0, api_name="/generate")
    # the session is still usable afterwards
    image, info, _ = client.predict("shapesworld", "a red circle", "", "default", 2, 5.0, 0, 0, 0, api_name="/generate")
    assert np.asarray(Image.open(image)).shape == (64, 64, 3)


def test_guidance_comparison_through_api(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    names = client.view_api(return_format="dict")["named_endpoints"]
    assert {"/guidance_compare", "/guidance_stop", "/guidance_restore"} <= set(names)
    gallery, files, table = client.predict(
        "shapesworld", "a small blue square at the top on a white background", "", ["cfg", "apg"], "{}",
        "default", 3, 5.0, 11, "none", "", None, "inpaint", "center", api_name="/guidance_compare")
    assert len(gallery) == 2
    captions = [g["caption"] for g in gallery]
    assert captions[0].startswith("cfg") and captions[1].startswith("apg")
    assert all("seed 11" in c and "NFE" in c and "[color" in c for c in captions)
    assert [row[0] for row in table["data"]] == ["cfg", "apg"]


def test_guidance_bad_input_is_a_clear_error(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="at least one guidance method"):
        client.predict("shapesworld", "a red circle", "", [], "{}", "default", 3, 5.0, 0, "none", "",
                       None, "inpaint", "center", api_name="/guidance_compare")
    with pytest.raises(Exception, match="JSON"):
        client.predict("shapesworld", "a red circle", "", ["cfg"], "{bad", "default", 3, 5.0, 0, "none", "",
                       None, "inpaint", "center", api_name="/guidance_compare")
    # an inverse problem with a ground truth of the wrong size: a clear message, and the app stays usable
    import tempfile

    small = tempfile.NamedTemporaryFile(suffix=".png", delete=False).name
    Image.new("RGB", (32, 32)).save(small)
    from gradio_client import handle_file

    with pytest.raises(Exception, match="32x32"):
        client.predict("shapesworld", "a red circle", "", ["measurement_hard"], "{}", "default", 3, 5.0, 0, "none", "",
                       handle_file(small), "inpaint", "center", api_name="/guidance_compare")


def test_inverse_problem_through_api(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    gallery, files, table = client.predict(
        "shapesworld", "a large red circle on the left on a gray background", "", ["measurement_hard", "measurement_soft"],
        "{}", "default", 4, 5.0, 3, "none", "", None, "super_resolution", "center", api_name="/guidance_compare")
    assert len(gallery) == 2 and all("PSNR" in g["caption"] for g in gallery)
