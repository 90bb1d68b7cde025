"""The check every hostile case makes: `main(argv)` exits 2 with one `error:` line that names the flag or file, no
traceback, and nothing under the workspace changed (every file hashed before and after)."""

import hashlib
import os
from pathlib import Path

from mambaout.cli import main


def snapshot(root: Path) -> dict[str, str]:
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                state[key] = f"-> {os.readlink(path)}"
            elif path.is_dir():
                state[key] = "dir"
            elif not path.is_file():  # a FIFO (reading it would wait for a writer) or a device
                state[key] = "special"
            else:
                state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def assert_refused(root: Path, capsys, argv: list[str], named: str) -> str:
    """Run `argv`; assert it was refused as above, naming `named`. Returns the error line."""
    before = snapshot(root)
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, captured.err)
    assert "Traceback" not in captured.err + captured.out
    assert named in lines[0] and len(lines[0]) < 2100, (argv, lines[0][:300])
    assert snapshot(root) == before, f"{argv} changed files on disk"
    return lines[0]
