"""Document collections: reading them (BEIR layout or JSONL) and ingesting them; the sample corpus."""
