"""What the tests share: small models, the model zoo with its cached couplings, transformer
configs, random architectures for property tests, and the CLI's example models. On the path
through ``pythonpath = ["tests"]`` in pyproject.toml; no test edits ``sys.path``."""
