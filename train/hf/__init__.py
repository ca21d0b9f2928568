"""The Hugging Face modeling code that train/export.py ships inside an exported folder."""
