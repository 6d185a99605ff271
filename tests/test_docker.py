"""The Docker image and the cluster job specs, checked without a Docker engine or a cluster.

The specs parse, every `pipeline` command in them is accepted by the CLI (as a dry run, with the
launcher's environment), the image pins pyproject's versions, and the Dockerfile follows our rules.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tomllib

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKER = os.path.join(REPO, "docker")
EXP_FPATH = os.path.join(DOCKER, "exp.yaml")
dockerfile_parse = pytest.importorskip("dockerfile_parse")


def _read(*parts: str) -> str:
    with open(os.path.join(REPO, *parts)) as f:
        return f.read()


def _k8s(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all(_read("docker", "k8s", name)) if d]
    assert len(docs) == 1 and docs[0]["kind"] == "Job", f"{name}: expected one Job, got {[d.get('kind') for d in docs]}"
    return docs[0]


def _container(job: dict) -> dict:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def _pipeline_args(argv: list[str]) -> list[str]:
    """The arguments after `pipeline` (a bare name or a path ending in it)."""
    i = next(i for i, a in enumerate(argv) if os.path.basename(a) == "pipeline")
    return argv[i + 1:]


def _sbatch_pipeline_args(name: str, env: dict[str, str]) -> list[str]:
    """The `pipeline ...` arguments of the one srun line of an sbatch script, its variables substituted."""
    text = _read("docker", "slurm", name).replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.lstrip().startswith("srun ")]
    match = re.search(r"pipeline\)?\"?\s+(run\s+[^'\n]*)", line)
    assert match, f"{name}: no `pipeline run ...` in its srun line: {line}"
    command = re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], match.group(1))
    return shlex.split(command)


def _dry_run(args: list[str], env: dict[str, str], tmp_path) -> dict:
    env = {"MIMIC_PIPELINE_HOME": str(tmp_path / "home"), **env}
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "JOB_COMPLETION_INDEX", "MIMIC_WORLD_SIZE"):
        env.setdefault(var, None)  # None unsets: the test machine's own launcher variables must not leak in
    result = CliRunner().invoke(cli, [*args, "--dry-run"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "home").exists(), "a dry run built the embedded default"
    return json.loads(result.stdout)


# -- the job specs ---------------------------------------------------------------------------------
def test_teacher_job_is_an_indexed_job_whose_world_size_is_its_completions(tmp_path):
    job = _k8s("teacher-job.yaml")
    spec, container = job["spec"], _container(job)
    env = {e["name"]: e["value"] for e in container["env"]}
    assert spec["completionMode"] == "Indexed"
    assert int(env["MIMIC_WORLD_SIZE"]) == spec["completions"] == spec["parallelism"]
    args = _pipeline_args(container.get("command", ["pipeline"]) + container["args"])
    args = [EXP_FPATH if a == "/config/exp.yaml" else a for a in args]
    last = spec["completions"] - 1
    plan = _dry_run(args, {"JOB_COMPLETION_INDEX": str(last), "MIMIC_WORLD_SIZE": env["MIMIC_WORLD_SIZE"]}, tmp_path)
    assert (plan["rank"], plan["world_size"]) == (last, spec["completions"])
    assert plan["store"].startswith("/shared/")  # on the volume every pod mounts


def test_student_job_runs_one_deepspeed_process_per_gpu(tmp_path):
    job = _k8s("student-job.yaml")
    container = _container(job)
    argv = container["command"] + container.get("args", [])
    assert argv[0] == "torchrun"
    nproc = int(next(a.split("=", 1)[1] for a in argv if a.startswith("--nproc_per_node=")))
    assert container["resources"]["limits"]["nvidia.com/gpu"] == nproc
    args = [EXP_FPATH if a == "/config/exp.yaml" else a for a in _pipeline_args(argv)]
    plan = _dry_run(args, {"RANK": "0", "WORLD_SIZE": str(nproc)}, tmp_path)
    assert plan["world_size"] == nproc
    assert plan["micro_batch_per_rank"] * plan["accumulation_steps"] * nproc == plan["global_batch"]


@pytest.mark.parametrize("name, launcher_env", [
    ("teacher.sbatch", {"SLURM_PROCID": "7", "SLURM_NTASKS": "8"}),
    ("student.sbatch", {"RANK": "0", "WORLD_SIZE": "8"}),  # what the deepspeed launcher sets per process
])
def test_sbatch_scripts_parse_and_their_command_is_accepted(name, launcher_env, tmp_path):
    fpath = os.path.join(DOCKER, "slurm", name)
    subprocess.run(["bash", "-n", fpath], check=True)
    args = _sbatch_pipeline_args(name, {"CONFIG": EXP_FPATH})
    plan = _dry_run(args, launcher_env, tmp_path)
    assert plan["world_size"] == 8


def test_student_sbatch_writes_a_hostfile_for_the_deepspeed_launcher():
    text = _read("docker", "slurm", "student.sbatch")
    assert "scontrol show hostnames" in text and "slots=" in text
    assert re.search(r"deepspeed --hostfile \"\$HOSTFILE\" --no_ssh --node_rank \"\$SLURM_NODEID\"", text)


# -- the dry runs ------------------------------------------------------------------------------------
def test_teacher_dry_run_for_1_and_8_ranks(tmp_path):
    one = _dry_run(["run", "teacher"], {}, tmp_path)
    assert (one["rank"], one["world_size"], one["queries"], one["shards"]) == (0, 1, 256, 16)  # the embedded set
    assert one["this_rank_writes"] == list(range(16)) and one["shards_per_rank"] == {"0": 16}
    assert one["fingerprint_fields"]["shots"] == 32 and one["store"] == os.path.join("runs", "store-vqav2-32shot")
    assert one["store_dtype"] == "float32"  # the embedded model's dtype, the default
    int8 = _dry_run(["run", "teacher", "--set", "teacher.store_dtype=int8"], {}, tmp_path)
    assert int8["store_dtype"] == "int8"
    eight = _dry_run(["run", "teacher", "--config", EXP_FPATH, "--rank", "7", "--world-size", "8"], {}, tmp_path)
    assert (eight["queries"], eight["shards"]) == (1000, 63)  # num_queries: the data root is not here
    assert eight["shards_per_rank"] == {str(r): 8 for r in range(7)} | {"7": 7}
    assert eight["this_rank_writes"] == list(range(7, 63, 8))


def test_student_dry_run_for_1_and_8_ranks(tmp_path):
    one = _dry_run(["run", "student"], {}, tmp_path)
    assert (one["world_size"], one["micro_batch_per_rank"], one["accumulation_steps"]) == (1, 2, 2)
    assert one["deepspeed"]["train_micro_batch_size_per_gpu"] == 2
    assert one["deepspeed"]["zero_optimization"]["stage"] == 2
    assert (one["items"], one["epochs"], one["steps_per_epoch"]) == (256, 40, 64)  # the embedded default's epochs
    eight = _dry_run(["run", "student", "--set", "student.global_batch=16", "--zero-stage", "3"],
                     {"RANK": "0", "WORLD_SIZE": "8"}, tmp_path)
    assert (eight["world_size"], eight["micro_batch_per_rank"], eight["accumulation_steps"]) == (8, 2, 1)
    assert eight["deepspeed"]["gradient_accumulation_steps"] == 1 and eight["zero_stage"] == 3


def test_student_dry_run_refuses_a_global_batch_the_ranks_cannot_split(tmp_path):
    result = CliRunner().invoke(cli, ["run", "student", "--dry-run"], catch_exceptions=True,
                                env={"RANK": "0", "WORLD_SIZE": "8", "MIMIC_PIPELINE_HOME": str(tmp_path)})
    assert result.exit_code != 0 and "global_batch 4 is not a multiple" in str(result.exception)


# -- the image ---------------------------------------------------------------------------------------
def _dockerfile():
    return dockerfile_parse.DockerfileParser(path=os.path.join(DOCKER, "Dockerfile"))


def _pins(requirements: list[str]) -> dict[str, str]:
    """{name: version} of `name[extras]==version` requirements."""
    return {re.sub(r"\[.*\]", "", name): version for name, version in (r.split("==") for r in requirements)}


def test_image_pins_pyprojects_versions_and_takes_torch_from_its_base():
    project = tomllib.loads(_read("pyproject.toml"))["project"]
    wanted = _pins(project["dependencies"])
    wanted["s3fs"] = _pins(project["optional-dependencies"]["test"])["s3fs"]  # for s3:// stores
    torch = wanted.pop("torch")
    runs = " ".join(i["value"] for i in _dockerfile().structure if i["instruction"] == "RUN")
    pinned = dict(re.findall(r"(?<![\w-])([A-Za-z][\w.-]*)==([\w.]+)", runs))
    assert "torch" not in pinned, "torch comes from the base image, never from pip"
    assert pinned == wanted, f"image pins differ from pyproject: {set(pinned.items()) ^ set(wanted.items())}"
    for image in _dockerfile().parent_images:
        assert image.split(":", 1)[1].startswith(f"{torch}-cuda"), f"{image}: base must provide torch {torch}"


def test_dockerfile_rules():
    df = _dockerfile()
    structure = [i for i in df.structure if i["instruction"] != "COMMENT"]
    assert len(df.parent_images) >= 2, "multi-stage: build with nvcc, run on the runtime image"
    for image in df.parent_images:
        name, _, tag = image.rpartition(":")
        assert name and tag and "/" not in tag and "$" not in image, f"{image}: base not pinned by tag"
        assert tag != "latest", f"{image}: pinned to latest"
    users = [i["value"] for i in structure if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    final_stage = structure[max(i for i, ins in enumerate(structure) if ins["instruction"] == "FROM"):]
    assert any(i["instruction"] == "USER" for i in final_stage), "USER must be set in the final stage"
    assert json.loads(next(i["value"] for i in structure if i["instruction"] == "ENTRYPOINT")) == ["pipeline"]
    assert any("DS_BUILD_" in i["value"] for i in structure if i["instruction"] == "RUN"), "DeepSpeed ops prebuilt"
    ignored = _read(".dockerignore").split()
    assert {".venv", "runs", ".git"} <= set(ignored)
