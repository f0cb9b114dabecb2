from hq_ptq.cli import app

app(prog_name="hq-ptq")
