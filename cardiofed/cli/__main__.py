from cardiofed.cli import app

app()
