import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


if os.environ.get("DISTILL_TEST_HIDE_DEBIAN") == "1":
    # The whole session, collection included (skip marks read `shutil.which`), runs as on a machine
    # without Debian's espeak-ng and fortunes packages: `.ci/run` runs the data tests so.
    from helpers import hide_debian_packages

    hide_debian_packages(pytest.MonkeyPatch())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
