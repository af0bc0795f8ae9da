"""`bulkdet run`: plan, read, decode, infer, post-process, write; local and on Ray."""
