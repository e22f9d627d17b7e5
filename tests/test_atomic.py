"""Atomic outputs: complete or absent, and readable by others as a plain write would be."""

import os
import stat
import subprocess
import sys


def test_outputs_get_the_modes_of_a_plain_write(tmp_path):
    """Under umask 022 a result file is 0644 and a result folder 0755 (tempfile alone gives
    0600/0700: a study shared with a group could not be read); umask 027 gives 0640/0750."""
    code = ("import sys; from pathlib import Path; from snaketune.atomic import atomic_dir, write_json\n"
            "out = Path(sys.argv[1]); write_json(out / 'r.json', {'a': 1})\n"
            "with atomic_dir(out / 'model') as tmp: (tmp / 'w.bin').write_bytes(b'x')\n")
    for umask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o027, 0o640, 0o750)):
        out = tmp_path / oct(umask)
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, preexec_fn=lambda u=umask: os.umask(u))
        assert stat.S_IMODE((out / "r.json").stat().st_mode) == file_mode
        assert stat.S_IMODE((out / "model").stat().st_mode) == dir_mode
        assert sorted(p.name for p in out.iterdir()) == ["model", "r.json"]
