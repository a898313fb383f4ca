"""Put on PYTHONPATH by models.vllm_compat.install(): child processes get the import alias too."""

try:
    from models.vllm_compat import install_import_alias

    install_import_alias()
except Exception:  # never break an interpreter's start-up
    pass
