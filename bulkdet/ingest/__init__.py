"""Reading what users give: walking sources, image headers, `bulkdet pack`."""
