"""`python -m infra.sandbox [--dest FOLDER]`: build the sandbox runtime (`runtime.py`); `make`
runs it. (Not `-m infra.sandbox.runtime`: the package imports that module first.)"""

from infra.sandbox.runtime import main

main()
