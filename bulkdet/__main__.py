from bulkdet.cli import app

app()
