"""Zero-flag entry point: `python main.py`, press Enter; or `torchrun --nproc_per_node=N main.py`.

Pick a preset from configs/ (or resume an interrupted run), then train it. Everything a
user changes, they change in a JSON preset."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

if __name__ == "__main__":
    os.chdir(ROOT)  # presets name paths relative to the project root
    sys.path.insert(0, str(ROOT))
    import program

    sys.exit(program.run(ROOT))
