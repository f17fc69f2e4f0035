"""``python -m featcache ...``: the `featcache` command, so that ``torchrun ... -m featcache build ...`` launches it.

This file is the command's entry point, not part of the library: nothing imports it, and it reaches the
CLI by running it (runpy), as the installed `featcache` script does, so the library never depends on cli/.
"""
import runpy

if __name__ == "__main__":  # a module walker importing this file must not start the command
    runpy.run_module("cli.featcache_cli")["main"](prog_name="featcache")
