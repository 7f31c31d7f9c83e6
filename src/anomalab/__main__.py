"""`python -m anomalab ...`: the command line (also the module entry of `torchrun -m anomalab ...`)."""

from anomalab.cli import main

if __name__ == "__main__":
    main(prog_name="anomalab")
