"""RESULTS.md holds one section per benchmark script; each run replaces its own section and leaves the others."""
from __future__ import annotations

import platform
import re
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    import ray
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {__import__('os').cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__}, ray {ray.__version__}; {gpu}. Date: {time.strftime('%Y-%m-%d')}")


def write_section(name: str, title: str, lines: list[str]) -> Path:
    """Replace the section `name` of RESULTS.md (or append it) with `title` and `lines`."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    begin, end = f"<!-- begin:{name} -->", f"<!-- end:{name} -->"
    block = "\n".join([begin, f"## {title}", "", f"Command: `python {' '.join(sys.argv)}`  ",
                       f"Machine: {machine()}", "", *lines, end])
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
    return RESULTS
