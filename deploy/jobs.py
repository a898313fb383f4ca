"""Operate training runs on a Ray cluster like a service: submit, status, logs, stop, scale.

Job functions are thin layers over Ray's ``JobSubmissionClient`` (the dashboard's HTTP job API,
addressed as ``http://HEAD:8265``). ``scale`` and ``advance_stage`` talk to the run's control actor
(``deploy.control``) through ``ray.init(address=HEAD:6379)``. A submitted job's id is also its run name
(``train.run_name``), so ``refocus scale <id>`` finds the control actor of the job ``refocus submit``
printed.

Token authentication, as Ray 2.60 does it (read from its source, ``ray/_private/authentication``):
a cluster is in token mode when ``RAY_AUTH_MODE=token``, or when that variable is unset and a token
exists (``ray start`` and ``ray.init()`` switch it on then). Clients find the token in
``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``; the HTTP
client sends it as ``authorization: Bearer <token>``, gRPC clients take it from the same places once
``RAY_AUTH_MODE=token`` is set in their process. Ray's own HTTP client sends the token only when the
client process has ``RAY_AUTH_MODE=token``, so a client started without it fails against a token
cluster; here the token is sent whenever one is found (and ``RAY_AUTH_MODE`` is not ``disabled``),
which matches the cluster's own rule.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shlex
import socket
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"

# Never uploaded with the working directory: environments, caches, data and run outputs (large, and
# specific to this machine).
WORKING_DIR_EXCLUDES = [".venv", ".tmp", ".cache", "artifacts", "runs", ".git",
                        ".pytest_cache", ".hypothesis", "__pycache__"]

TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class ClusterError(Exception):
    """The cluster could not be reached or refused a request (bad address, unknown job, wrong token)."""


# --------------------------------------------------------------------------- authentication


def resolve_token(token: str | None = None) -> str | None:
    """The token a client sends: ``token`` if given, else Ray's sources in Ray's order
    (``RAY_AUTH_TOKEN``, the ``RAY_AUTH_TOKEN_PATH`` file, ``~/.ray/auth_token``); None when there is
    none or ``RAY_AUTH_MODE=disabled``."""
    if token is not None:
        if not token.strip():
            raise ValueError("the authentication token is empty")
        return token.strip()
    if os.environ.get(AUTH_MODE_ENV, "").lower() == "disabled":
        return None
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip()
    if os.environ.get(TOKEN_PATH_ENV):
        path = Path(os.environ[TOKEN_PATH_ENV])
        text = path.read_text().strip() if path.is_file() else ""
        if not text:  # Ray itself refuses this case rather than falling back
            raise ValueError(f"{TOKEN_PATH_ENV}={path}: no such file, or it is empty")
        return text
    default = Path.home() / ".ray" / "auth_token"  # looked up at call time, as Ray's loader does
    if default.is_file():
        return default.read_text().strip() or None
    return None


def read_token_file(path: str | Path) -> str:
    """A token kept in a file (so it never shows in the process list, unlike a flag's value)."""
    try:
        text = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"--token-file {path}: {e.strerror}") from None
    if not text:
        raise ValueError(f"--token-file {path}: the file is empty")
    return text


def auth_headers(token: str | None) -> dict[str, str]:
    """HTTP headers for the job API: the header Ray's own client builds."""
    return {} if token is None else {"authorization": f"Bearer {token}"}


def _request_errors() -> tuple[type[Exception], ...]:
    """What Ray's clients raise when the cluster is unreachable or says no: connection and HTTP errors
    (OSError), failed requests such as an unknown job (RuntimeError), 401/403 (ray's AuthenticationError)."""
    from ray.exceptions import RayError

    return OSError, RuntimeError, RayError


def _client(address: str, token: str | None):
    from ray.job_submission import JobSubmissionClient

    headers = auth_headers(resolve_token(token))
    try:
        return JobSubmissionClient(address, headers=headers)
    except _request_errors() as e:
        raise ClusterError(f"cannot reach the Ray job API at {address}: {_reason(e)}") from None


def _reason(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# --------------------------------------------------------------------------- jobs


def new_submission_id() -> str:
    """``refocus-YYYYmmdd-HHMMSS-xxxxxx``: sortable, unique, and a valid ``train.run_name``."""
    return f"refocus-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def job_overrides(*, run_name: str, overrides: list[str]) -> list[str]:
    """The job's ``--set`` items: its run name (= submission id), joining its cluster, then the user's."""
    fixed = [f"train.run_name={json.dumps(run_name)}"]  # quoted: "20240501" or "null" stay names
    if not any(o.partition("=")[0].strip() == "cluster.address" for o in overrides):
        fixed.append("cluster.address=auto")  # a job's driver joins its cluster; it never starts a Ray
    return fixed + list(overrides)


def entrypoint(config: str, *, overrides: list[str]) -> str:
    """The job's shell command: ``refocus train CONFIG --set ...``."""
    args = ["refocus", "train", config]
    for item in overrides:
        args += ["--set", item]
    return shlex.join(args)


def submit(config_path: str | Path, *, address: str, overrides: list[str], run_name: str | None = None,
           working_dir: str | Path = ".", env_vars: dict[str, str], pip: list[str] | None = None,
           token: str | None = None) -> str:
    """Submit ``refocus train CONFIG`` as a Ray job; returns the submission id (= the run name).

    The config is validated here first (errors name the field before anything is uploaded). It must
    lie inside ``working_dir``, which is uploaded (minus ``WORKING_DIR_EXCLUDES``) and is the job's
    current directory, so the job reads it by its relative path.
    """
    from pydantic import ValidationError

    from deploy.config import TrainConfig, load_run_config
    from deploy.config_loading import config_chain

    if run_name is not None:
        # Checked by train.run_name's own rule, but named as the flag; an empty one (an unset $RUN) is refused
        # too: it used to become a random id, which `refocus scale` would then not find under the name meant.
        try:
            TrainConfig(run_name=run_name)
        except ValidationError as error:
            reason = error.errors()[0]["msg"]
            raise ValueError(f"--run-name {run_name!r}: {reason} (it is the submission id and the name `refocus "
                             f"scale` finds the job by)") from None
    submission_id = new_submission_id() if run_name is None else run_name
    root = Path(working_dir).resolve()
    config = Path(config_path).resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"--working-dir {working_dir}: not a directory")
    _check_uploaded(config, root=root)
    sets = job_overrides(run_name=submission_id, overrides=overrides)
    loaded = load_run_config(config, sets)  # exactly what the job will load: a bad field fails here, not on the cluster
    if loaded.train.run_name != submission_id:  # the user's overrides come after the job's own run name
        raise ValueError("train.run_name is the submission id: pass --run-name instead of setting train.run_name")
    for base in config_chain(config)[1:]:  # the files it starts from are read on the cluster too
        _check_uploaded(base, root=root)
    relative = config.relative_to(root)
    command = entrypoint(relative.as_posix(), overrides=sets)

    runtime_env: dict = {"working_dir": str(root), "excludes": WORKING_DIR_EXCLUDES, "env_vars": dict(env_vars)}
    if pip:
        runtime_env["pip"] = list(pip)
    client = _client(address, token)
    try:
        client.submit_job(entrypoint=command, submission_id=submission_id, runtime_env=runtime_env)
    except _request_errors() as e:
        raise ClusterError(f"submitting to {address} failed: {_reason(e)}") from None
    log.info("submitted %s: %s", submission_id, command)
    return submission_id


def status(job_id: str, *, address: str, token: str | None = None) -> dict:
    """State of job ``job_id``: status (PENDING/RUNNING/SUCCEEDED/FAILED/STOPPED), message, times."""
    client = _client(address, token)
    try:
        info = client.get_job_info(job_id)
    except _request_errors() as e:
        raise ClusterError(f"job {job_id!r} on {address}: {_reason(e)}") from None
    return {"submission_id": info.submission_id, "status": str(getattr(info.status, "value", info.status)),
            "message": info.message, "entrypoint": info.entrypoint, "start_time": info.start_time,
            "end_time": info.end_time, "driver_exit_code": info.driver_exit_code}


def _check_uploaded(path: Path, *, root: Path) -> None:
    """Raise unless ``path`` is uploaded with the working dir ``root``."""
    if not path.is_relative_to(root):
        raise ValueError(f"config {path} is outside the working dir {root}: only the working dir is uploaded")
    # Ray reads the excludes as .gitignore patterns: a name matches at any depth.
    excluded = next((part for part in path.relative_to(root).parts if part in WORKING_DIR_EXCLUDES), None)
    if excluded is not None:
        raise ValueError(f"config {path} is under {excluded}/, which is not uploaded")
    ignore_file = _ignore_file_excluding(path, root=root)
    if ignore_file is not None:
        raise ValueError(f"config {path} is left out of the upload by {ignore_file} (Ray's upload honours .gitignore "
                         "and .rayignore files; RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 stops it reading .gitignore)")


def _ignore_file_excluding(path: Path, *, root: Path) -> Path | None:
    """The directory whose .gitignore or .rayignore makes Ray's working-dir upload leave ``path`` out, read as Ray
    (pinned in pyproject.toml) reads them: each directory's ignore files apply to everything below it."""
    from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE
    from ray._private.runtime_env.packaging import get_excludes_from_ignore_files

    include_gitignore = os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    quiet = logging.getLogger(f"{__name__}.ignore_files")
    quiet.setLevel(logging.WARNING)  # Ray logs every ignore file it reads
    parts = path.relative_to(root).parts
    for depth in range(len(parts)):
        level = root.joinpath(*parts[:depth])
        excludes = get_excludes_from_ignore_files(level, include_gitignore=include_gitignore, logger=quiet)
        for below in range(depth + 1, len(parts) + 1):
            if any(exclude(root.joinpath(*parts[:below])) for exclude in excludes):
                return level
    return None


def logs(job_id: str, *, address: str, follow: bool = False, token: str | None = None) -> Iterator[str]:
    """The job's output so far, or (``follow``) chunks as they come until the job ends."""
    client = _client(address, token)
    if not follow:
        try:
            yield client.get_job_logs(job_id)
        except _request_errors() as e:
            raise ClusterError(f"logs of job {job_id!r} on {address}: {_reason(e)}") from None
        return
    status(job_id, address=address, token=token)  # an unknown id fails here, not deep in a websocket
    loop = asyncio.new_event_loop()
    stream = client.tail_job_logs(job_id)
    waiting = None  # the wait for the next chunk
    try:
        while True:
            waiting = loop.create_task(stream.__anext__())
            try:
                yield loop.run_until_complete(waiting)
            except StopAsyncIteration:
                return
            except _request_errors() as e:
                raise ClusterError(f"following logs of job {job_id!r} on {address}: {_reason(e)}") from None
    finally:
        # Ctrl-C leaves the wait for the next chunk running: cancel it first, or closing the stream raises
        # "aclose(): asynchronous generator is already running".
        if waiting is not None and not waiting.done():
            waiting.cancel()
            loop.run_until_complete(asyncio.gather(waiting, return_exceptions=True))
        loop.run_until_complete(stream.aclose())
        loop.close()


def stop(job_id: str, *, address: str, token: str | None = None) -> bool:
    """Ask job ``job_id`` to stop; False when it had already finished."""
    client = _client(address, token)
    try:
        return client.stop_job(job_id)
    except _request_errors() as e:
        raise ClusterError(f"stopping job {job_id!r} on {address}: {_reason(e)}") from None


# --------------------------------------------------------------------------- a running job's control actor


def _control(run: str, *, address: str, token: str | None, wait_s: float):
    """Connect this process to the cluster (if it is not already) and find run ``run``'s control actor,
    waiting up to ``wait_s`` for it to appear (a job just submitted is still setting up)."""
    import ray

    from deploy.control import CONTROL_NAMESPACE, control_actor_name

    if not ray.is_initialized():
        if address != "auto":
            _check_reachable(address)
        _use_token_for_grpc(resolve_token(token))
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except _request_errors() as e:  # a wrong token also ends here, as a failed connection
            raise ClusterError(f"cannot connect to the Ray cluster at {address}: {_reason(e)} (check the address, "
                               "and that the token is the cluster's: --token-file, RAY_AUTH_TOKEN, "
                               "~/.ray/auth_token)") from None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return ray.get_actor(control_actor_name(run), namespace=CONTROL_NAMESPACE)
        except ValueError:
            if time.monotonic() >= deadline:
                raise ClusterError(f"no running job named {run!r} at {address} (no actor "
                                   f"{control_actor_name(run)!r} in namespace {CONTROL_NAMESPACE!r})") from None
            time.sleep(0.5)


def _check_reachable(address: str) -> None:
    """Fail fast where nothing listens at the GCS address (``ray.init`` would retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        raise ValueError(f"--address (or $RAY_ADDRESS) {address}: give the cluster's GCS address HOST:PORT (e.g. "
                         "127.0.0.1:6379) or 'auto', not a URL")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=10):
            pass
    except OSError as e:
        raise ClusterError(f"cannot connect to the Ray cluster at {address}: {e.strerror or e}") from None


def _use_token_for_grpc(token: str | None) -> None:
    """Ray's gRPC clients read the mode and token from the environment, through a config cached at
    import; this sets both and refreshes the cache the way Ray's own ``_enable_token_auth`` does."""
    if token is None:
        return
    os.environ[AUTH_MODE_ENV] = "token"
    os.environ[TOKEN_ENV] = token
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _call(run: str, method: str, *args, address: str, token: str | None, wait_s: float = 0.0):
    import ray

    control = _control(run, address=address, token=token, wait_s=wait_s)
    try:
        return ray.get(getattr(control, method).remote(*args), timeout=60)
    except ray.exceptions.RayTaskError as e:  # the control actor rejected the request (e.g. out of bounds)
        raise ValueError(str(e.cause) if e.cause is not None else _reason(e)) from None
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
        raise ClusterError(f"job {run!r} did not answer ({type(e).__name__}); has it just ended?") from None


def scale(run: str, *, address: str, rollout_workers: int, token: str | None = None, wait_s: float = 0.0) -> dict:
    """Ask run ``run`` for ``rollout_workers`` rollout workers; returns the desired count and its status.

    The driver applies it within half a second of its next poll; retired workers finish their
    in-flight calls first, so no group is lost. ``wait_s``: how long to wait for the run to appear.
    """
    desired = _call(run, "scale", rollout_workers, address=address, token=token, wait_s=wait_s)
    return {"run": run, "desired_rollout_workers": desired,
            "status": _call(run, "status", address=address, token=token)}


def advance_stage(run: str, *, address: str, reason: str = "manual", token: str | None = None,
                  wait_s: float = 0.0) -> dict:
    """Ask run ``run`` to move its curriculum to the next stage now; returns its status."""
    _call(run, "advance_stage", reason, address=address, token=token, wait_s=wait_s)
    return {"run": run, "advance_requested": reason, "status": _call(run, "status", address=address, token=token)}
