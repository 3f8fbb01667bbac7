from sandboxd.cli.main import app

app()
