"""The commands: each parses its flags, calls the library (``indexing``, the engines) and prints.

``pipelines/cli.py`` mounts them on the one ``faceaudit`` entry point.
"""
