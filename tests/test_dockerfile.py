"""The Dockerfile on paper (Docker is not run here): Ray's image of the manifests' Ray version,
the ports the manifests use, a command that pyproject installs, and a .dockerignore that keeps
what `pip install .` needs.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
KUBERAY = sorted((ROOT / "cluster_configs").glob("kuberay-*.yaml"))


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def base_image() -> str:
    args = dict(a.split("=", 1) for op, a in instructions() if op == "ARG" and "=" in a)
    (image,) = [a for op, a in instructions() if op == "FROM"]
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)


def exec_form(op: str) -> list[str]:
    (value,) = [a for o, a in instructions() if o == op]
    return json.loads(value)


def manifest_images_and_ray_versions() -> tuple[set[str], set[str]]:
    text = "\n".join(p.read_text() for p in KUBERAY)
    return set(re.findall(r"image: (rayproject/ray:\S+)", text)), set(re.findall(r'rayVersion: "([^"]+)"', text))


def test_the_base_is_rays_image_of_the_manifests_ray_version():
    image = base_image()
    repository, _, tag = image.partition(":")
    assert repository == "rayproject/ray", f"{DOCKERFILE}: FROM {image}"
    images, versions = manifest_images_and_ray_versions()
    assert versions == {tag.split("-")[0]}, f"{DOCKERFILE}: Ray {tag}, the manifests' rayVersion {versions}"
    assert image in images, f"{DOCKERFILE}: FROM {image}; the manifests run {images}"
    assert tag.split("-")[0] == ray.__version__, f"the tests run Ray {ray.__version__}, the image {tag}"


def test_exposed_ports_are_the_ones_the_manifests_serve():
    (exposed,) = [a for op, a in instructions() if op == "EXPOSE"]
    ports = {int(p) for p in exposed.split()}
    rayjob = next(yaml.safe_load_all((ROOT / "cluster_configs/kuberay-rayjob.yaml").read_text()))
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    flags = dict(zip(argv[2::2], argv[3::2]))
    assert ports == {int(flags["--port"]), int(flags["--http-port"])}, f"{DOCKERFILE}: EXPOSE {exposed}"


def test_the_command_is_installed_by_pyproject_and_serves_on_the_exposed_ports():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    command = [*exec_form("ENTRYPOINT"), *exec_form("CMD")]  # exec form: SIGTERM reaches the server
    assert command[0] in scripts, f"{DOCKERFILE}: {command[0]} is not in [project.scripts] {sorted(scripts)}"
    from tools.cli import build_parser

    args = build_parser().parse_args(command[1:])
    (exposed,) = [a for op, a in instructions() if op == "EXPOSE"]
    assert {args.port, args.http_port} == {int(p) for p in exposed.split()} and args.host == "0.0.0.0"
    (healthcheck,) = [a for op, a in instructions() if op == "HEALTHCHECK"]
    assert f"127.0.0.1:{args.http_port}/health" in healthcheck, healthcheck


def test_dockerignore_keeps_what_pip_install_needs():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {"pyproject.toml", "README.md", *(p.rstrip("*") for p in packages)}
    assert not needed & ignored, f".dockerignore leaves out {needed & ignored}, which `pip install .` reads"
