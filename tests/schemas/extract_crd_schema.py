"""Write a KubeRay CRD's v1 openAPIV3Schema as a JSON Schema file for the manifest tests.

    git -C kuberay show v1.7.0:ray-operator/config/crd/bases/ray.io_rayjobs.yaml > /tmp/crd.yaml
    python tests/schemas/extract_crd_schema.py /tmp/crd.yaml v1.7.0 COMMIT > tests/schemas/rayjob-v1.json

Keeps the v1 version's `openAPIV3Schema` without `status` (a manifest sets none) and without
`description` fields (most of the CRD's bytes), so the file stays near 200 kB. The result keeps
the `x-kubernetes-*` keys, which JSON Schema validators ignore; `$comment` names the source.
"""

import json
import sys

import yaml

SOURCE = "https://github.com/ray-project/kuberay"


def without_descriptions(node):
    if isinstance(node, dict):
        return {k: without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [without_descriptions(v) for v in node]
    return node


def main(crd_path: str, tag: str, commit: str) -> None:
    crd = yaml.safe_load(open(crd_path))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = without_descriptions(v1["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    comment = (f"{crd['spec']['names']['kind']} {crd['spec']['group']}/v1: the openAPIV3Schema of {SOURCE} "
               f"ray-operator/config/crd/bases/{crd_path.rsplit('/', 1)[-1]} at {tag} (commit {commit}), "
               "Apache License 2.0 (Copyright the KubeRay authors); status and descriptions removed by "
               "tests/schemas/extract_crd_schema.py")
    json.dump({"$comment": comment, **schema}, sys.stdout, separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
