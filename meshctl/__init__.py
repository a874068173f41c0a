"""The operator's tool: the `meshctl` command line (cli.py) and `meshctl up` (localmesh/).

It may import every plane: it starts them. No plane imports it (lint-imports enforces both).
"""
