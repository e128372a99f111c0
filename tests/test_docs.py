"""The documentation stays true: README.md and docs/*.md against the code they describe.

A reader copies a command line from the docs, or looks a setting up there; a flag that was
renamed, a setting nobody documented or one that is no longer read each send them wrong. The
settings the product reads are found in its source (every read of the environment mapping), so a
new setting fails here until docs/configuration.md has a row for it.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import re
import subprocess
import sys

import pytest

from settings import PROJECT_DIR

DOCS = [PROJECT_DIR / "README.md", *sorted((PROJECT_DIR / "docs").glob("*.md"))]
SCRIPTS = ("pipeline", "consumer", "replay", "simulator", "sample_data", "localstack")
# commands the docs show that are not the product's scripts: their flags are theirs to check
OTHER_TOOLS = ("reset.sh", "connect.sh", "psql", "systemctl", "journalctl", "curl", "git")
# names of the environment mapping in the product's code (settings.read_environment's result)
ENV_NAMES = {"env", "environ", "values", "os.environ"}
FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
SCRIPT = re.compile(r"\b(" + "|".join(SCRIPTS) + r")\.py\b")
SETTING = re.compile(r"^[A-Z][A-Z0-9_]{2,}$")


def script_flags() -> dict[str, set[str]]:
    """Every option string of each script's parser: `build_parser()` where the script has one,
    else what its `--help` lists."""
    flags = {}
    for name in SCRIPTS:
        module = importlib.import_module(name)
        if hasattr(module, "build_parser"):
            parser: argparse.ArgumentParser = module.build_parser()
            flags[name] = {opt for action in parser._actions for opt in action.option_strings}
        else:
            out = subprocess.run([sys.executable, f"{name}.py", "--help"], cwd=PROJECT_DIR,
                                 capture_output=True, text=True, timeout=60, check=True).stdout
            flags[name] = set(FLAG.findall(out.split("options:", 1)[-1]))
    return flags


def _units(text: str):
    """(heading, unit) for each table row, list item or paragraph: where a flag's script is
    looked for."""
    heading, unit = "", []
    for line in text.splitlines() + [""]:
        starts = line.startswith(("#", "|", "- ")) or re.match(r"\d+\. ", line) or not line.strip()
        if starts and unit:
            yield heading, " ".join(unit)
            unit = []
        if line.startswith("#"):
            heading = line
        elif line.strip():
            unit.append(line.strip())


def _code_lines(text: str):
    """The lines of fenced code blocks, each with the script whose command line it continues:
    a line naming a script starts its command, an indented line continues it."""
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        script = None
        for line in block.splitlines():
            line = re.sub(r"\s#.*", "", line)  # a comment after the command
            match = SCRIPT.search(line)
            if match:
                script = match.group(1)
                yield script, line[match.end():]
            elif script and line[:1].isspace():
                yield script, line
            else:
                script = None


def _span_flags(text: str):
    """(scripts, flags, where) for each inline code span that shows a flag, outside fenced code:
    flags after a script's name belong to it; a span that is only a flag belongs to the scripts
    its table row, list item or paragraph names or its section is about; with none, to any
    script, unless another tool is named there (`-y` of reset.sh)."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for heading, unit in _units(prose):
        named = set(SCRIPT.findall(unit))
        for span in re.findall(r"`([^`]+)`", unit):
            match = SCRIPT.search(span)
            if match:
                yield {match.group(1)}, FLAG.findall(span[match.end():]), span
            elif FLAG.match(span):
                if named or SCRIPT.search(heading):
                    yield named | set(SCRIPT.findall(heading)), FLAG.findall(span), span
                elif not any(tool in unit for tool in OTHER_TOOLS):
                    yield set(SCRIPTS), FLAG.findall(span), span


def documented_flags(name: str, text: str):
    """(doc, scripts, flag, where) for every flag a page shows for one of the scripts."""
    for script, line in _code_lines(text):
        for flag in FLAG.findall(line):
            yield name, {script}, flag, line.strip()
    for scripts, flags, span in _span_flags(text):
        for flag in flags:
            yield name, scripts, flag, span


def wrong_flags(shown, flags: dict[str, set[str]]) -> list[str]:
    return [f"{doc}: {flag} in `{where}` is not a flag of {' or '.join(sorted(scripts))}.py"
            for doc, scripts, flag, where in shown
            if not any(flag in flags[script] for script in scripts)]


def test_every_flag_the_docs_show_exists_in_its_scripts_parser():
    flags = script_flags()
    shown = [row for doc in DOCS for row in documented_flags(doc.name, doc.read_text())]
    assert len({flag for *_, flag, _ in shown}) > 20, "the docs' flags were not found"
    wrong = wrong_flags(shown, flags)
    assert not wrong, "\n".join(wrong)


def test_a_flag_its_script_lacks_is_caught():
    """The check above is not blind: a made-up flag in a synopsis, a flag shown for the wrong
    script, and a span under a script's heading are each reported."""
    text = ("## pipeline.py: the batch run\n\n```\npython3 pipeline.py [-b BUCKET]\n"
            "                    [--no-such-flag]\n```\n\n- `--stop-at-end` stops\n"
            "- `consumer.py --force`\n")
    wrong = wrong_flags(documented_flags("x.md", text), script_flags())
    assert [line.split(" in ")[0] for line in wrong] == [
        "x.md: --no-such-flag", "x.md: --stop-at-end", "x.md: --force"]


def _is_env(node: ast.AST) -> bool:
    return ast.unparse(node) in ENV_NAMES


def settings_read(paths=None) -> dict[str, str]:
    """Each environment name the product's modules read, with the file that reads it: the key of
    `env.get(...)`, `env[...]` or `os.getenv(...)`, or a name passed beside the mapping to a
    helper such as `_get(env, "DB_HOST")`."""
    read = {}
    for path in paths or sorted(PROJECT_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            keys = []
            if isinstance(node, ast.Call):
                func = node.func
                via_method = isinstance(func, ast.Attribute) and (
                    (func.attr == "get" and _is_env(func.value)) or ast.unparse(func) == "os.getenv")
                if via_method or any(_is_env(arg) for arg in node.args):
                    keys = node.args
            elif isinstance(node, ast.Subscript) and _is_env(node.value):
                keys = [node.slice]
            for key in keys:
                if isinstance(key, ast.Constant) and isinstance(key.value, str) \
                        and SETTING.match(key.value):
                    read.setdefault(key.value, path.name)
    return read


def settings_documented() -> set[str]:
    """The first cell of each row of docs/configuration.md's settings table."""
    text = (PROJECT_DIR / "docs" / "configuration.md").read_text()
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", text, flags=re.M))


def test_every_setting_read_is_documented_and_every_documented_one_is_read():
    import settings

    read = settings_read()
    # the scan sees the settings the code lists itself (not blind to a way of reading them)
    assert set(settings.SERVICE_KEYS) | set(settings.SECRET_KEYS) <= set(read)
    documented = settings_documented()
    undocumented = sorted(f"{name} (read in {read[name]})" for name in set(read) - documented)
    assert not undocumented, ("settings read but not in docs/configuration.md's table: "
                              + ", ".join(undocumented))
    unread = sorted(documented - set(read))
    assert not unread, "settings in docs/configuration.md that nothing reads: " + ", ".join(unread)


def test_a_new_setting_is_found_however_it_is_read(tmp_path):
    """A setting added the way settings.py reads them fails the test above until documented."""
    module = tmp_path / "newsettings.py"
    module.write_text(
        "def _database(env):\n"
        "    mode = _get(env, 'DB_SSLMODE') or env.get('DB_SSLROOTCERT')\n"
        "    fmt = _choice(env, 'ALERT_WEBHOOK_FORMAT', ('slack', 'teams'))\n"
        "    return mode, fmt, env['SSL_CA_LOCATION'], os.getenv('KAFKA_CLIENT_ID')\n"
        "RECORD = record['EXHIBITION_NAME']  # a JSON field, not a setting\n")
    assert set(settings_read([module])) == {"DB_SSLMODE", "DB_SSLROOTCERT", "ALERT_WEBHOOK_FORMAT",
                                           "SSL_CA_LOCATION", "KAFKA_CLIENT_ID"}


def test_env_example_names_only_settings_that_are_read():
    names = re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (PROJECT_DIR / ".env.example").read_text(),
                       flags=re.M)
    assert names
    assert not sorted(set(names) - set(settings_read()))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_between_the_docs_lead_somewhere(doc):
    text = doc.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md":
            headings = re.findall(r"^#+ .*", path.read_text(), flags=re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{doc.name}: broken links {broken}"


def test_ci_runs_the_readmes_test_command():
    readme = (PROJECT_DIR / "README.md").read_text()
    assert re.search(r"^make test\b", readme, flags=re.M)
    ci = (PROJECT_DIR / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M)


def test_readme_is_a_front_door():
    """At most about 12 KB: the rest belongs in docs/."""
    assert (PROJECT_DIR / "README.md").stat().st_size <= 12 * 1024
