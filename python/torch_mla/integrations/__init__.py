"""Adapters that put torch_mla into training frameworks. Each submodule imports its framework
when it is imported; the torch_mla package itself depends on none of them."""
