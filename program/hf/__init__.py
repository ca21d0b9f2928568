"""The Hugging Face modeling code that program/export.py ships inside an exported folder."""
