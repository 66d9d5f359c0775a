"""``aios``: the operator's command line for the mesh (runs, approvals, dead letters, health).

Addresses come from the same ``AIOS_*`` variables the services read (``MeshSettings``), so
the CLI works against the embedded stack (``make up``) and an external deployment alike."""
