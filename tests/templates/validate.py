#!/usr/bin/env python3
"""Renders hyper's deployment and CI templates (templates/) and validates them.

  validate.py                              render every template with test values and check it
  validate.py render NAME OUTDIR [K=V...]  render templates/NAME into OUTDIR (defaults fill the rest)
  validate.py emit-script github|gitlab    print the build+publish shell of that CI template

Checks print one line each (ok / FAIL / SKIPPED) and a closing count; the exit
code is 1 when any check failed. A checker that is not installed is SKIPPED,
never passed. Needs PyYAML, python-hcl2 and check-jsonschema: without them the
script re-runs itself in the venv that scripts/pytools makes.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "templates"
HERE = Path(__file__).resolve().parent

try:
    import hcl2
    import yaml
    import check_jsonschema  # noqa: F401 (run as a module below)
except ImportError:
    if os.environ.get("HYPER_PYTOOLS_REEXEC"):
        raise
    p = subprocess.run([str(ROOT / "scripts/pytools")], stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit("validate.py: needs PyYAML, python-hcl2 and check-jsonschema; scripts/pytools failed")
    venv = p.stdout.strip()
    os.environ["HYPER_PYTOOLS_REEXEC"] = "1"
    python = os.path.join(venv, "bin", "python")
    os.execv(python, [python, __file__, *sys.argv[1:]])

# Each template's parameters: None means required, a string is the default.
PARAMS = {
    "github-actions": {"IMAGE": None, "BUCKET": None, "APP": None, "HYPER_GIT": None,
                       "HYPER_REF": "main", "BRANCH": "main", "RUNNER": "ubuntu-latest",
                       "CI_IMAGE": "rust:1-bookworm"},
    "gitlab-ci": {"IMAGE": None, "BUCKET": None, "APP": None, "HYPER_GIT": None,
                  "HYPER_REF": "main", "CI_IMAGE": "rust:1-bookworm"},
    "systemd": {"APP": None, "BUCKET": None, "AWS_REGION": "us-east-1", "HYPER_ARGS": "",
                "BINDIR": "/usr/local/bin", "UPDATE_INTERVAL": "1min", "STOP_TIMEOUT": "30s"},
    "nomad": {"APP": None, "BUCKET": None, "AWS_REGION": "us-east-1", "DATACENTER": "*",
              "COUNT": "1", "HYPERBOOT": "/usr/local/bin/hyperboot", "GUEST_MEM": "256M",
              "CPU_MHZ": "500", "MEMORY_MB": "384"},
    "marathon": {"APP": None, "BUCKET": None, "AWS_REGION": "us-east-1",
                 "HYPERBOOT": "/usr/local/bin/hyperboot", "GUEST_MEM": "256M",
                 "CPUS": "0.5", "MEM_MB": "384", "INSTANCES": "1"},
    "kubernetes": {"APP": None, "IMAGE": None, "HANDLER": "hyper", "RUNTIME_CLASS": "hyper",
                   "GUEST_MEM": "256Mi", "CPUS": "1", "OVERHEAD_MEM": "32Mi"},
}
TEST_VALUES = {"IMAGE": "registry.example.com/demo:1", "BUCKET": "hyper-test", "APP": "demo",
               "HYPER_GIT": "https://git.example.com/hyper.git", "HYPER_ARGS": "-m 256M -- /srv/demo"}
# The CI templates' build+publish shell: where it is, and the only variables it may use.
CI = {
    "github": ("github-actions", "hyperbuild.yml", "GITHUB_SHA"),
    "gitlab": ("gitlab-ci", ".gitlab-ci.yml", "CI_COMMIT_SHA"),
}
PLACEHOLDER = re.compile(r"@@([A-Z][A-Z0-9_]*)@@")


class Fail(Exception):
    pass


# ---- rendering ----

def render(name, outdir, values):
    """Renders templates/NAME into outdir; returns the rendered paths."""
    params = PARAMS[name]
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise Fail(f"{name} has no parameter {', '.join(unknown)} (it has {', '.join(params)})")
    full = {k: values.get(k, default) for k, default in params.items()}
    missing = [k for k, v in full.items() if v is None]
    if missing:
        raise Fail(f"{name} needs {' '.join(k + '=...' for k in missing)}")
    out, used = [], set()
    for src in sorted((TEMPLATES / name).rglob("*")):
        if not src.is_file():
            continue
        text = src.read_text()
        used |= set(PLACEHOLDER.findall(text))
        undeclared = sorted(set(PLACEHOLDER.findall(text)) - set(params))
        if undeclared:
            raise Fail(f"{src.relative_to(ROOT)} uses undeclared @@{'@@, @@'.join(undeclared)}@@")
        dst = Path(outdir) / src.relative_to(TEMPLATES / name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(PLACEHOLDER.sub(lambda m: full[m.group(1)], text))
        dst.chmod(src.stat().st_mode & 0o777)
        out.append(dst)
    unused = sorted(set(params) - used)
    if unused:
        raise Fail(f"parameters {', '.join(unused)} are declared but templates/{name} does not use them")
    return out


def test_values(name, outdir):
    values = {k: TEST_VALUES[k] for k in PARAMS[name] if k in TEST_VALUES}
    if name == "systemd":
        values["BINDIR"] = str(outdir)  # so systemd-analyze finds hyper-update
    return values


# ---- CI shell ----

def ci_shell(kind, path):
    """The build+publish shell blocks of a rendered CI file, and all its shell blocks."""
    doc = yaml.safe_load(Path(path).read_text())
    if kind == "github":
        steps = [s for job in doc["jobs"].values() for s in job.get("steps", [])]
        runs = {s.get("id"): s["run"] for s in steps if "run" in s}
        if "build" not in runs or "publish" not in runs:
            raise Fail("no run steps with id build and publish")
        return [runs["build"], runs["publish"]], list(runs.values())
    job = doc.get("hyperbuild") or {}
    if not job.get("script"):
        raise Fail("no hyperbuild job with a script")
    every = [job.get(k) or [] for k in ("before_script", "script", "after_script")]
    return list(job["script"]), [line for block in every for line in block]


def emit_script(kind, path):
    blocks, _ = ci_shell(kind, path)
    _, _, sha = CI[kind]
    head = (f"#!/bin/sh\n# The build and publish shell of hyper's {CI[kind][0]} template.\n"
            f"# Needs IMAGE, BUCKET, APP, {sha}, AWS_* (HYPER_SIGNING_KEY to sign) in the environment and hyperbuild on PATH.\n"
            "set -eu\n")
    return head + "\n".join(b.rstrip("\n") for b in blocks) + "\n"


def shell_vars(script):
    """Variables a script reads that it did not set itself."""
    assigned = set(re.findall(r"(?:^|[;&|\s])([A-Za-z_][A-Za-z0-9_]*)=", script))
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", script))
    return used - assigned


# ---- checks ----

class Report:
    def __init__(self):
        self.passed = self.failed = self.skipped = 0

    def check(self, name, fn, *args):
        try:
            note = fn(*args)
        except Exception as e:  # a crash in a check is that check's failure
            self.failed += 1
            msg = str(e) if isinstance(e, Fail) else f"{type(e).__name__}: {e}"
            msg = msg.strip().replace("\n", "\n        ")
            print(f"FAIL    {name}: {msg}", flush=True)
            return
        if isinstance(note, str) and note.startswith("SKIPPED"):
            self.skipped += 1
            print(f"SKIPPED {name}: {note[len('SKIPPED '):]}", flush=True)
        else:
            self.passed += 1
            print(f"ok      {name}", flush=True)


def run(cmd, **kw):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if p.returncode != 0:
        raise Fail(f"{' '.join(map(str, cmd))} exited {p.returncode}\n{p.stdout}")
    return p.stdout


def jsonschema(path, *schema):
    run([sys.executable, "-m", "check_jsonschema", "--color", "never", *schema, str(path)])


def sh_syntax(script):
    run(["sh", "-n"], input=script)


def shellcheck(script):
    if not shutil.which("shellcheck"):
        return "SKIPPED shellcheck: not installed (apt-get install shellcheck)"
    run(["shellcheck", "-s", "sh", "-"], input=script)


def ci_vars(kind, path):
    blocks, _ = ci_shell(kind, path)
    script = "\n".join(blocks)
    if "${{" in script:
        raise Fail("build/publish shell uses ${{ }} expressions: pass values through env instead")
    # key: the signing key's temporary file, made from HYPER_SIGNING_KEY.
    allowed = {"IMAGE", "BUCKET", "APP", CI[kind][2], "HYPER_SIGNING_KEY", "key"}
    extra = sorted(v for v in shell_vars(script) if v not in allowed and not v.startswith("AWS_"))
    if extra:
        raise Fail(f"build/publish shell reads {', '.join(extra)}; only {', '.join(sorted(allowed))}, AWS_* allowed")


def readme_documents(name):
    text = (TEMPLATES / "README.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)
    section = next((s for s in sections if f"`{name}/`" in s.split("\n", 1)[0]), None)
    if section is None:
        raise Fail(f"templates/README.md has no section headed with `{name}/`")
    missing = [p for p in PARAMS[name] if f"`{p}`" not in section]
    if missing:
        raise Fail(f"templates/README.md's {name} section does not document {', '.join(missing)}")
    stale = [p for p in re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", section, flags=re.M) if p not in PARAMS[name]]
    if stale:
        raise Fail(f"templates/README.md's {name} section documents {', '.join(stale)}, which it does not have")


def systemd_verify(outdir):
    if not shutil.which("systemd-analyze"):
        return "SKIPPED systemd-analyze: not installed"
    units = []
    for tpl in ("hyperboot@.service", "hyper-update@.service", "hyper-update@.timer"):
        inst = outdir / tpl.replace("@.", "@demo.")
        inst.symlink_to(tpl)
        units.append(str(inst))
    out = run(["systemd-analyze", "verify", "--man=no", "--recursive-errors=no", *units])
    if out.strip():  # verify warns (unknown keys, bad values) without failing
        raise Fail(out)


def env_file(path):
    lines = [l for l in Path(path).read_text().splitlines() if l.strip() and not l.startswith("#")]
    bad = [l for l in lines if not re.match(r"[A-Za-z_][A-Za-z0-9_]*=", l)]
    if bad:
        raise Fail(f"not KEY=VALUE: {bad}")
    if not any(l.startswith("HYPER_URL=s3://") for l in lines):
        raise Fail("no HYPER_URL=s3://... line")


def nomad_structure(path):
    opts = hcl2.SerializationOptions(with_comments=False, explicit_blocks=False,
                                     strip_string_quotes=True, preserve_heredocs=False)
    with open(path) as f:
        doc = hcl2.load(f, serialization_options=opts)
    variables = {k for v in doc.get("variable", []) for k in v}
    if not {"bucket", "key"} <= variables:
        raise Fail(f"variables {sorted(variables)}: want bucket and key")
    jobs = doc.get("job", [])
    if len(jobs) != 1:
        raise Fail(f"{len(jobs)} job blocks, want 1")
    (job,) = jobs[0].values()
    tasks = [t for g in job.get("group", []) for gb in g.values() for tb in gb.get("task", [])
             for t in tb.values()]
    if not tasks:
        raise Fail("no group with a task")
    for task in tasks:
        if task.get("driver") not in ("raw_exec", "exec"):
            raise Fail(f"driver {task.get('driver')!r}: want raw_exec or exec")
        (config,) = task["config"]
        if not config.get("command", "").endswith("hyperboot"):
            raise Fail(f"config.command {config.get('command')!r} does not run hyperboot")
        url = (config.get("args") or [""])[0]
        if url != "s3://${var.bucket}/${var.key}":
            raise Fail(f"first argument {url!r}: want s3://${{var.bucket}}/${{var.key}}")
        if not (task.get("resources") or [{}])[0].get("memory"):
            raise Fail("task has no resources.memory")


def marathon_structure(path):
    app = json.loads(Path(path).read_text())
    if "hyperboot" not in app.get("cmd", ""):
        raise Fail("cmd does not run hyperboot")
    if not app.get("env", {}).get("HYPER_URL", "").startswith("s3://"):
        raise Fail("env.HYPER_URL is not an s3:// URL")


# hyper-update's digest comparison, run with stand-ins for hyperboot and systemctl.
FAKE_HYPERBOOT = """#!/bin/sh
if [ "$1" = pull ]; then
  [ -z "${FAKE_FAIL:-}" ] || { echo "hyperboot: store unreachable" >&2; exit 125; }
  [ -z "${FAKE_GARBAGE:-}" ] || { echo '{"oops":1}'; exit 0; }
  printf '{"url":"%s","digest":"%s","path":"/var/cache/hyper/artifacts/sha256/%s","transferred":0}\\n' \\
    "$3" "$FAKE_DIGEST" "${FAKE_DIGEST#sha256:}"
else
  echo "hyperboot $*" >> "$FAKE_LOG"
  [ "$1" != prepare ] || [ -z "${FAKE_PREPARE_FAIL:-}" ] || { echo "hyperboot: no KVM" >&2; exit 125; }
fi
"""
FAKE_SYSTEMCTL = '#!/bin/sh\necho "systemctl $*" >> "$FAKE_LOG"\n'
D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
UPDATE_CASES = [
    # (name, args, env, want exit code, want log); each starts with D1 recorded but --boot
    ("--boot records the digest and boots the pulled file", ["--boot", "demo", "-m", "256M"],
     {"FAKE_DIGEST": D2}, 0, f"hyperboot /var/cache/hyper/artifacts/sha256/{'2' * 64} -m 256M"),
    ("--check unchanged exits 0", ["--check", "demo"], {"FAKE_DIGEST": D1}, 0, ""),
    ("--check changed exits 10", ["--check", "demo"], {"FAKE_DIGEST": D2}, 10, ""),
    ("update unchanged does not restart", ["demo"], {"FAKE_DIGEST": D1}, 0, ""),
    ("update changed prepares with the unit's options, then restarts the unit", ["demo"],
     {"FAKE_DIGEST": D2, "HYPER_ARGS": "-m 256M -p 80:80 -- /srv/demo"}, 0,
     f"hyperboot prepare /var/cache/hyper/artifacts/sha256/{'2' * 64} -m 256M -p 80:80 -- /srv/demo\n"
     "systemctl try-restart hyperboot@demo.service"),
    ("update changed restarts the unit when the prepare fails", ["demo"],
     {"FAKE_DIGEST": D2, "FAKE_PREPARE_FAIL": "1"}, 0,
     f"hyperboot prepare /var/cache/hyper/artifacts/sha256/{'2' * 64}\n"
     "systemctl try-restart hyperboot@demo.service"),
    ("--check when the store fails exits 1", ["--check", "demo"], {"FAKE_FAIL": "1"}, 1, ""),
    ("--check on malformed pull output exits 1", ["--check", "demo"], {"FAKE_GARBAGE": "1"}, 1, ""),
    ("--check without HYPER_URL exits 1", ["--check", "demo"], {"HYPER_URL": ""}, 1, ""),
    ("--check with nothing booted exits 10", ["--check", "other"], {"FAKE_DIGEST": D1}, 10, ""),
]


def update_case(script, work, args, env, code, log):
    record = work / "run/demo/digest"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(D1 + "\n")
    want_record = D2 if args[0] == "--boot" else D1
    logf = work / "log"
    logf.write_text("")
    full = {**os.environ, "PATH": f"{work / 'bin'}:{os.environ['PATH']}", "FAKE_LOG": str(logf),
            "HYPER_RUN_DIR": str(work / "run"), "HYPER_URL": "s3://hyper-test/demo/current.hvm", **env}
    p = subprocess.run([str(script), *args], env=full, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    got = (p.returncode, record.read_text().strip(), logf.read_text().strip())
    if got != (code, want_record, log):
        raise Fail(f"exit {got[0]} (want {code}), record {got[1]!r} (want {want_record!r}), "
                   f"ran {got[2]!r} (want {log!r})\n{p.stdout}")


# ---- each template's checks ----

def check_ci(r, kind, d):
    name, file, _ = CI[kind]
    path = d / file
    schema = "vendor.github-workflows" if kind == "github" else "vendor.gitlab-ci"
    r.check(f"{name}: check-jsonschema --builtin-schema {schema}", jsonschema, path, "--builtin-schema", schema)
    r.check(f"{name}: build/publish shell uses only env vars", ci_vars, kind, path)
    r.check(f"{name}: sh -n on every shell block", each_block, sh_syntax, kind, path)
    r.check(f"{name}: shellcheck on every shell block", each_block, shellcheck, kind, path)
    r.check(f"{name}: emit-script output parses", lambda: sh_syntax(emit_script(kind, path)))


def each_block(check, kind, path):
    for block in ci_shell(kind, path)[1]:
        note = check(block)
        if note:
            return note


def check_systemd(r, d):
    script = (d / "hyper-update").read_text()
    r.check("systemd: sh -n hyper-update", sh_syntax, script)
    r.check("systemd: shellcheck hyper-update", shellcheck, script)
    r.check("systemd: systemd-analyze verify", systemd_verify, d)
    r.check("systemd: app.env is KEY=VALUE lines with an s3:// HYPER_URL", env_file, d / "app.env")
    fake = d.parent / "fake"
    (fake / "bin").mkdir(parents=True)
    for tool, text in (("hyperboot", FAKE_HYPERBOOT), ("systemctl", FAKE_SYSTEMCTL)):
        (fake / "bin" / tool).write_text(text)
        (fake / "bin" / tool).chmod(0o755)
    for case, *want in UPDATE_CASES:
        r.check(f"systemd: hyper-update {case}", update_case, d / "hyper-update", fake, *want)


def check_nomad(r, d):
    r.check("nomad: python-hcl2 parses, job/group/task/driver/command", nomad_structure,
            d / "hyperboot.nomad.hcl")


def check_marathon(r, d):
    path = d / "hyperboot.json"
    r.check("marathon: check-jsonschema against the AppDefinition subset", jsonschema, path,
            "--schemafile", str(HERE / "marathon-app.schema.json"))
    r.check("marathon: cmd runs hyperboot on an s3:// HYPER_URL", marathon_structure, path)


def kubernetes_structure(d):
    import tomllib
    conf = tomllib.loads((d / "containerd-hyper.toml").read_text())
    runtimes = conf["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    rc = yaml.safe_load((d / "runtimeclass.yaml").read_text())
    pod = yaml.safe_load((d / "pod.yaml").read_text())
    if conf.get("version") != 2:
        raise Fail("the containerd snippet is not config version 2")
    if rc["handler"] not in runtimes:
        raise Fail(f"the RuntimeClass's handler {rc['handler']} is not a runtime in the containerd snippet")
    if runtimes[rc["handler"]].get("runtime_type") != "io.containerd.hyper.v2":
        raise Fail("the handler's runtime_type is not io.containerd.hyper.v2")
    if pod["spec"].get("runtimeClassName") != rc["metadata"]["name"]:
        raise Fail("the pod does not name the RuntimeClass")
    if len(pod["spec"]["containers"]) != 1:
        raise Fail("the shim runs one app container per pod")


def check_kubernetes(r, d):
    for f, schema in (("runtimeclass.yaml", "k8s-runtimeclass"), ("pod.yaml", "k8s-pod")):
        r.check(f"kubernetes: {f}: check-jsonschema against the {schema} subset", jsonschema,
                d / f, "--schemafile", str(HERE / f"{schema}.schema.json"))
    r.check("kubernetes: the containerd snippet, RuntimeClass and pod agree", kubernetes_structure, d)


CHECKS = {
    "github-actions": lambda r, d: check_ci(r, "github", d),
    "gitlab-ci": lambda r, d: check_ci(r, "gitlab", d),
    "systemd": check_systemd,
    "nomad": check_nomad,
    "marathon": check_marathon,
    "kubernetes": check_kubernetes,
}


# ---- main ----

def validate_all():
    r = Report()
    work = Path(tempfile.mkdtemp(prefix="hyper-templates."))
    try:
        for name in PARAMS:
            d = work / name
            r.check(f"{name}: README documents every parameter", readme_documents, name)
            before = r.failed
            r.check(f"{name}: renders", lambda: render(name, d, test_values(name, d)) and None)
            if r.failed == before:
                CHECKS[name](r, d)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"templates: {r.passed} passed, {r.failed} failed, {r.skipped} skipped")
    return 1 if r.failed else 0


def main(argv):
    if not argv:
        return validate_all()
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "render" and len(rest) >= 2 and rest[0] in PARAMS:
            values = dict(kv.split("=", 1) for kv in rest[2:] if "=" in kv)
            if len(values) != len(rest) - 2:
                raise Fail("parameters are KEY=VALUE")
            for path in render(rest[0], rest[1], values):
                print(path)
            return 0
        if cmd == "emit-script" and len(rest) == 1 and rest[0] in CI:
            name, file, _ = CI[rest[0]]
            with tempfile.TemporaryDirectory() as d:
                render(name, d, test_values(name, d))
                sys.stdout.write(emit_script(rest[0], Path(d) / file))
            return 0
    except Fail as e:
        print(f"validate.py: {e}", file=sys.stderr)
        return 1
    print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
    print(f"templates: {', '.join(PARAMS)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
