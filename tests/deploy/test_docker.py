"""docker/Dockerfile: hadolint finds nothing, and .dockerignore lets through exactly what the image copies."""

from __future__ import annotations

import re

from tests.deploy.support import ROOT, run, tool

DOCKERFILE = ROOT / "docker" / "Dockerfile"


def test_hadolint_finds_nothing():
    result = run(tool("hadolint"), "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_lets_through_what_the_image_copies():
    # COPY <src>... <dest> from the build context (COPY --from=<stage> reads another stage, not the context).
    copied = set()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied.update(line.split()[1:-1])
    allowed = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert copied == allowed, f"COPY sources {sorted(copied)} != .dockerignore exceptions {sorted(allowed)}"


def test_both_images_run_as_uid_10001_with_an_exec_form_entrypoint():
    text = DOCKERFILE.read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    for stage in stages:
        name = stage.split()[2] if " AS " in stage.splitlines()[0] else stage.split()[0]
        if name == "wheel":
            continue
        assert "\nUSER 10001:10001\n" in stage, name  # deploy/k8s/base/deployment.yaml runs as the same uid
        assert '\nENTRYPOINT ["hymba-serve"]\n' in stage, name
        assert "\nHEALTHCHECK " in stage and "/health" in stage, name
        assert "\nEXPOSE 8000\n" in stage, name
