"""Run configs: `base` holds what every method shares; one module per method, demo and is_test.

Each module's get_config() returns a locked ml_collections.ConfigDict; its docstring shows the
command that runs it. Override any field with --config.<group>.<field>=value.
"""
