"""The wheel's `dependencies` (a scikit-build-core metadata provider, pyproject.toml): torch pinned
to the release this build compiled against. LibTorch has no stable ABI, so libtorch_mla only
loads into the torch it was built with; the pin makes pip say so instead of a failing import."""


def dynamic_metadata(field, settings=None, project=None):
    import torch  # the torch of the build environment, which the library is compiled against

    if field != "dependencies":
        raise RuntimeError(f"torch_pin provides 'dependencies' only, not {field!r}")
    release = torch.__version__.split("+")[0]  # 2.14.1+cu130 -> 2.14.1 (any local build of it)
    return [f"torch=={release}"]
