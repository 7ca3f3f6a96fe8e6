"""synapse-supervisor: run a Synapse main process and its workers as one ordered Docker stack.

The package is split by job: `stackfile` reads the operator's declaration into the plain data of
`stack`, `catalogue` knows every worker type, `synapse_config` writes each process's Synapse
config, `lint` checks them together, `lifecycle` orders start and stop, `docker_adapter` is the
only module that talks to Docker, and `daemon`/`cli` are the two programs.
"""

__version__ = "0.1.0"
