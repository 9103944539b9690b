"""Where a benchmark's results go: ``<name>.json`` (everything) and ``<name>.md`` (a table)."""

import json
import os
from typing import Dict, List


def write(out_dir: str, name: str, command: str, rounds: List[Dict], summary: Dict,
          markdown_lines: List[str]) -> None:
    """Writes the command, the machine's core count, every round and the summary as JSON,
    and ``markdown_lines`` as the markdown report."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"command": command, "cores": os.cpu_count(), "rounds": rounds,
                   "summary": summary}, f, indent=2)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(markdown_lines))
