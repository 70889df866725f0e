"""The docs keep up with the code: every metric and every warning or error the archiver can log
is documented (docs/operations.md), and nothing documented is gone from the code. No servers needed."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
OPERATIONS = REPO / "docs" / "operations.md"


def section(title, doc):
    """The text of doc (a Markdown file) under `## title`, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", doc.read_text(), re.M | re.S)
    assert match, f"{doc.relative_to(REPO)} has no '## {title}' section"
    return match.group(1)


def metric_names():
    src = (REPO / "src" / "metrics.rs").read_text()
    return set(re.findall(r'pub const [A-Z_]+: &str = "(kafka_s3_archiver_[a-z_]+)";', src))


def logged_problems():
    """The message of every tracing::warn! and tracing::error! in src/ and its subfolders, up to its
    first `{`."""
    out = {}
    for path in sorted((REPO / "src").rglob("*.rs")):
        src = path.read_text()
        for m in re.finditer(r"tracing::(warn|error)!\(", src):
            literals, depth, i = [], 1, m.end()
            while depth:
                if src[i] == '"':
                    end = re.compile(r'"((?:[^"\\]|\\.)*)"').match(src, i)
                    literals.append(end.group(1))
                    i = end.end()
                    continue
                depth += {"(": 1, ")": -1}.get(src[i], 0)
                i += 1
            # The message is the macro's last string literal; "{e:#}" alone repeats an error documented elsewhere.
            message = literals[-1].split("{")[0].strip() if literals else ""
            if message:
                out[message] = f"{path.relative_to(REPO / 'src')}:{src[:m.start()].count(chr(10)) + 1}"
    return out


def test_the_monitoring_section_lists_exactly_the_metrics_the_code_defines():
    documented = set(re.findall(r"^\| `(kafka_s3_archiver_[a-z_]+)` \|", section("Monitoring", OPERATIONS), re.M))
    assert len(metric_names()) >= 20
    assert documented == metric_names(), (
        f"undocumented: {metric_names() - documented}; documented but gone: {documented - metric_names()}")


def test_every_logged_warning_and_error_is_in_troubleshooting():
    text = section("Troubleshooting", OPERATIONS)
    problems = logged_problems()
    assert len(problems) >= 15, problems
    missing = {m: where for m, where in problems.items() if m not in text}
    assert not missing, f"logged but not in the Troubleshooting section of docs/operations.md: {missing}"


def test_every_configuration_error_is_covered_by_name():
    """Configuration errors read `VARIABLE: what is wrong`; the section explains that form, and
    every variable a configuration error can name is in the configuration table."""
    assert "(any `VARIABLE: …`)" in section("Troubleshooting", OPERATIONS)
    src = (REPO / "src" / "config.rs").read_text()
    named = set(re.findall(r'invalid\(\s*"([A-Z_]+)"', src))
    table = set(re.findall(r"^\| `([A-Z_<>]+)` \|", section("Configuration", README), re.M))
    assert named and named <= table, named - table


def test_every_relative_link_and_image_in_the_docs_exists():
    """README and docs/: each `[text](path)` and `![alt](path)` that is not a URL names a file of
    the repository (the status page's screenshot included)."""
    broken = []
    for doc in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            path = target.split("#")[0]
            if path and not re.match(r"[a-z]+:", path) and not (doc.parent / path).exists():
                broken.append(f"{doc.relative_to(REPO)}: {target}")
    assert not broken, broken
