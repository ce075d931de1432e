"""The one typeface the world sets text in: DejaVu Sans, regular and bold (Debian's fonts-dejavu-core;
`make font-deps` installs it). Signs and mockups both draw with it, so both need exactly this font: a
substitute would render a different world from the same seed."""
from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path

from PIL import ImageFont

from kosmo.errors import KosmoError

FONT_DIRS = ("/usr/share/fonts/truetype/dejavu",)
_FONTS = {False: ("DejaVuSans.ttf", "DejaVu Sans"), True: ("DejaVuSans-Bold.ttf", "DejaVu Sans:bold")}


@cache
def font_path(bold: bool) -> Path:
    """DejaVu Sans (bold or regular): from Debian's fonts-dejavu-core directory, else wherever fontconfig has it."""
    file, pattern = _FONTS[bold]
    for folder in FONT_DIRS:
        if (Path(folder) / file).is_file():
            return Path(folder) / file
    if shutil.which("fc-match"):
        found = subprocess.run(["fc-match", "-f", "%{file}", pattern], capture_output=True, text=True,
                               check=False).stdout
        if Path(found).name == file:  # fc-match always answers; a substitute font would be a different world
            return Path(found)
    raise KosmoError(f"font {file} not found; install fonts-dejavu-core (`make font-deps` does)")


@cache
def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path(bold)), size)


def clear_cache() -> None:
    """Forget the fonts found, so that a changed FONT_DIRS is looked in again."""
    font_path.cache_clear()
    font.cache_clear()
