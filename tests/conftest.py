import torch

import torch_mla  # noqa: F401  (loads the operator library once for every test)


def pytest_report_header(config):
    return f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
