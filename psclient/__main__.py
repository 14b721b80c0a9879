"""`python -m psclient`: the `psclient` command line (psclient/cli/main.py)."""

from psclient.cli.main import main

if __name__ == "__main__":
    main()
