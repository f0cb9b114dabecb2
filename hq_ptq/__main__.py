"""``python -m hq_ptq`` (and ``torchrun -m hq_ptq``): the hq-ptq command line."""

from hq_ptq.cli import app

# the guard matters: spawned worker processes import the main module again, and must not rerun the CLI
if __name__ == "__main__":
    app(prog_name="hq-ptq")
