"""A FIFO or device named as a pipeline file or as verify-deploy data is refused at once, never read."""
from __future__ import annotations

import os

import pytest

from amct_pipeline.ascend.verify import npy_batches
from amct_pipeline.errors import AmctError
from amct_pipeline.pipeline.loader import load_pipeline


@pytest.fixture
def fifo(tmp_path):
    def make(name: str):
        path = tmp_path / name
        os.mkfifo(path)
        return path
    return make


def test_pipeline_file_that_is_a_fifo_is_refused(fifo):
    path = fifo("p.yaml")
    with pytest.raises(AmctError, match="is a FIFO, not a regular file"):
        load_pipeline(str(path))


def test_verify_deploy_data_that_is_a_fifo_or_device_is_refused(fifo):
    path = fifo("x.npy")
    with pytest.raises(AmctError, match="is a FIFO"):
        next(npy_batches({"": path}, ["x"], 4))
    with pytest.raises(AmctError, match=r"give a \.npy or \.npz file"):
        next(npy_batches({"": "/dev/zero"}, ["x"], 4))
