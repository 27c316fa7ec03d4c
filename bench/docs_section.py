"""docs/benchmarks.md holds one section per benchmark script, each rewritten by its own next run."""
import os


def write_section(path, name, text, part=""):
    """Puts `text` between the markers of section `name` (bench/{name}.py's; `part`: one of its several sections)
    in the markdown file at path (the file and the section are created when missing; the others stay as they are)."""
    name_part = f"{name} ({part})" if part else name
    start, end = f"<!-- {name_part}: written by bench/{name}.py -->", f"<!-- end of {name_part} -->"
    old = "# Benchmarks\n\nEach section is written by the command it names.\n"
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    section = f"{start}\n{text.rstrip()}\n{end}"
    if start in old and end in old:
        new = old[:old.index(start)] + section + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + section + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(new)
