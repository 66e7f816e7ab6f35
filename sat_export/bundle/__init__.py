"""The bundle format, one owner: files, manifest, seal (``format``), and the manifest schema (``schema``)."""
