"""Writes docs/API.md from the public docstrings: every public function and
class of bnlab's modules with its signature and docstring (examples included).

    python docs/make_api.py          # rewrite docs/API.md
    python docs/make_api.py --check  # exit 1 if docs/API.md is stale
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

MODULES = (
    "bnlab",
    "bnlab.stats",
    "bnlab.linen",
    "bnlab.nnx",
    "bnlab.collectives",
    "bnlab.parallel",
    "bnlab.diagnostics",
    "bnlab.data",
    "bnlab.models",
    "bnlab.train",
)
OUT = Path(__file__).resolve().parent / "API.md"


def _signature(obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    # default values that are functions print an address: keep only the name
    sig = re.sub(
        r"<(function|built-in function|class) ([\w.]+)( at 0x[0-9a-f]+)?>", r"\2", sig
    )
    return sig.replace("'", "")


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__ or "(no docstring)")


def render() -> str:
    out = [
        "# bnlab API reference",
        "",
        "Generated from the docstrings by `python docs/make_api.py` (a test keeps",
        "it current). Each public name of each module, with its signature.",
        "",
    ]
    for name in MODULES:
        mod = importlib.import_module(name)
        out += [f"## `{name}`", "", _doc(mod), ""]
        exported = getattr(mod, "__all__", [])
        for attr in exported:
            obj = getattr(mod, attr)
            if inspect.ismodule(obj):
                continue
            origin = getattr(obj, "__module__", name)
            if (
                name == "bnlab"
                or origin == name
                or name in ("bnlab.train", "bnlab.data", "bnlab.models")
            ):
                pass
            else:
                continue
            kind = (
                "class"
                if inspect.isclass(obj)
                else "function"
                if callable(obj)
                else "constant"
            )
            if kind == "constant":
                text = re.sub(r" at 0x[0-9a-f]+", "", repr(obj))[:300]
                out += [f"### `{name}.{attr}`", "", f"Constant: `{text}`", ""]
                continue
            out += [
                f"### `{name}.{attr}{_signature(obj)}`",
                "",
                f"*{kind}*, defined in `{origin}`",
                "",
                "```text",
                _doc(obj),
                "```",
                "",
            ]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    text = re.sub(r" at 0x[0-9a-f]+", "", render())  # object addresses vary
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python docs/make_api.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
