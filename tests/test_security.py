"""Security: the compose stack's MLflow server refuses unauthenticated requests; no secrets or defaults ship.

The compose file is checked statically (basic-auth app on, passwords required from ``.env``, nothing published beyond
127.0.0.1, workers log in), ``docker/check-env.sh`` (``make stack-check``) against good and bad ``.env`` files, and the
authentication for real without a Docker engine: ``mlflow server --app-name basic-auth`` with the committed
``docker/mlflow/basic_auth.ini`` (its user store moved into a temporary directory) on loopback, over a temporary SQLite
backend, where an unauthenticated REST call gets 401 and an authenticated one succeeds.
"""

from __future__ import annotations

import ast
import base64
import configparser
import json
import os
import re
import struct
import subprocess
import sys
import time
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

try:
    from tests import pg
except ImportError:  # tests/ is not a package: pytest puts it on sys.path itself
    import pg  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
AUTH_INI = ROOT / "docker" / "mlflow" / "basic_auth.ini"
CHECK_ENV = ROOT / "docker" / "check-env.sh"
SECRETS = ("POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
ADMIN, ADMIN_PASSWORD = "admin", "s3cure-test-Passw0rd"


# --------------------------------------------------------------------------------------------- compose, statically
def _services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_compose_mlflow_runs_the_basic_auth_app_with_the_password_from_env() -> None:
    mlflow = _services()["mlflow"]
    command = " ".join(mlflow["command"])
    assert re.search(r"\bmlflow server --app-name basic-auth\b", command), command
    env = mlflow["environment"]
    # `:?` makes compose refuse to start when the variable is missing or empty; no default value anywhere.
    assert re.fullmatch(r"\$\{MLFLOW_ADMIN_PASSWORD:\?[^}]+\}", env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    assert re.fullmatch(
        r"\$\{MLFLOW_FLASK_SERVER_SECRET_KEY:\?[^}]+\}", env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    )
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    assert "./docker/mlflow/basic_auth.ini:/etc/mlflow/basic_auth.ini:ro" in mlflow["volumes"]
    for name in SECRETS:
        for m in re.finditer(r"\$\{" + name + r"(:?[-?])?([^}]*)\}", COMPOSE.read_text()):
            assert m.group(1) in (None, ":?"), f"{name} has a default in docker-compose.yml: {m.group(0)}"

    ini = configparser.ConfigParser()
    ini.read(AUTH_INI)
    assert not ini["mlflow"].get("admin_password"), "the auth config must not hold a password"
    auth_db = ini["mlflow"]["database_uri"]
    assert auth_db.startswith("sqlite:////mlauth/"), auth_db
    assert any(v.endswith(":/mlauth") for v in mlflow["volumes"])
    assert not any(":/mlauth" in v for v in _services()["worker"]["volumes"]), (
        "workers must not see the user store"
    )


def test_compose_publishes_mlflow_on_loopback_only_and_postgres_not_at_all() -> None:
    services = _services()
    assert "ports" not in services["postgres"], "PostgreSQL must stay on the compose network"
    for name, svc in services.items():
        for port in svc.get("ports", []):
            spec = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
            assert spec.startswith("127.0.0.1:"), f"{name} publishes {spec!r} beyond the host's loopback"
    assert services["mlflow"]["ports"], "the UI must be reachable from the host's loopback"


def test_compose_workers_authenticate() -> None:
    env = _services()["worker"]["environment"]
    assert env["MLFLOW_TRACKING_USERNAME"] == "${MLFLOW_ADMIN_USERNAME:-admin}"
    assert re.fullmatch(r"\$\{MLFLOW_ADMIN_PASSWORD:\?[^}]+\}", env["MLFLOW_TRACKING_PASSWORD"])
    # The admin user the server creates is the one the workers log in as.
    assert (
        _services()["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_USERNAME"] == env["MLFLOW_TRACKING_USERNAME"]
    )


def test_no_env_file_is_committed_and_the_example_holds_placeholders_only() -> None:
    proc = subprocess.run(
        ["git", "ls-files", "--", ".env", "*.env", "**/.env"], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout: {proc.stderr.strip()}")
    assert proc.stdout.strip() == "", f"committed env files: {proc.stdout.split()}"
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert {example[k] for k in SECRETS} == {"change-me"}


# --------------------------------------------------------------------------------------------- make stack-check
def _check_env(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CHECK_ENV), str(path)], capture_output=True, text=True, timeout=30)


def test_stack_check_refuses_missing_placeholder_and_short_secrets(tmp_path: Path) -> None:
    proc = _check_env(ENV_EXAMPLE)
    assert proc.returncode == 2
    assert [line.split()[1] for line in proc.stderr.splitlines()] == list(SECRETS), proc.stderr
    assert all("placeholder" in line for line in proc.stderr.splitlines())

    good = {k: f"'{k.lower()}-Xk4PqZ9'" for k in SECRETS}
    env = tmp_path / ".env"
    env.write_text("".join(f"{k}={v}\n" for k, v in good.items()))
    assert _check_env(env).returncode == 0, _check_env(env).stderr

    env.write_text(f"POSTGRES_PASSWORD={good['POSTGRES_PASSWORD']}\nexport MLFLOW_ADMIN_PASSWORD=short\n")
    proc = _check_env(env)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"check-env: MLFLOW_ADMIN_PASSWORD in {env} is shorter than 12 characters",
        f"check-env: MLFLOW_FLASK_SERVER_SECRET_KEY is not set in {env}",
    ]
    proc = _check_env(tmp_path / "missing.env")
    assert proc.returncode == 2 and "not found" in proc.stderr and "cp .env.example .env" in proc.stderr

    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}  # under `make test`
    make = subprocess.run(["make", "-s", "--no-print-directory", "-n", "stack-up"], cwd=ROOT, capture_output=True,
                          text=True, env=env)
    if make.returncode == 0:  # no make: the script is what matters
        lines = make.stdout.splitlines()
        assert lines[0] == "docker/check-env.sh .env" and "docker compose up" in lines[-1]


# --------------------------------------------------------------------------------------------- a real auth server
def _auth_server_env(tmp: Path, admin_password: str) -> dict[str, str]:
    """The mlflow service's environment from docker-compose.yml, with the auth config's user store under ``tmp``."""
    ini = configparser.ConfigParser()
    ini.read(AUTH_INI)
    ini["mlflow"]["database_uri"] = f"sqlite:///{tmp / 'basic_auth.db'}"
    config = tmp / "basic_auth.ini"
    with open(config, "w") as fh:
        ini.write(fh)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DATABRICKS_"))}
    env.update(
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        MLFLOW_AUTH_CONFIG_PATH=str(config),
        MLFLOW_AUTH_ADMIN_USERNAME=ADMIN,
        MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
        MLFLOW_FLASK_SERVER_SECRET_KEY="test-csrf-signing-key-0123456789",
    )
    return env


def _start_auth_server(tmp: Path, admin_password: str, timeout: float = 120) -> pg.MlflowServer:
    """``mlflow server --app-name basic-auth`` on 127.0.0.1, as the compose file's ``mlflow`` service runs it."""
    pytest.importorskip(
        "flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth] (Flask-WTF); pip install -e .[dev]"
    )
    tmp.mkdir(parents=True, exist_ok=True)
    port = pg.free_port()
    exe = Path(sys.executable).parent / "mlflow"
    store = (f"sqlite:///{tmp / 'mlflow.db'}", (tmp / "artifacts").as_uri())
    argv = [str(exe) if exe.exists() else "mlflow", "server", "--app-name", "basic-auth"]
    argv += ["--backend-store-uri", store[0], "--default-artifact-root", store[1]]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    logfile = tmp / "mlflow-server.log"
    with open(logfile, "wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp, start_new_session=True,
            env=_auth_server_env(tmp, admin_password),
        )  # fmt: skip
    server = pg.MlflowServer(proc=proc, port=port, logfile=logfile)
    deadline = time.monotonic() + timeout
    while (
        proc.poll() is None and time.monotonic() < deadline
    ):  # an exited server is returned: the caller reads its log
        try:
            if _get(f"{server.uri}/health")[0] == 200:
                break
        except OSError:  # not listening yet
            time.sleep(0.3)
    else:
        if proc.poll() is None:
            server.stop()
            raise RuntimeError(
                f"mlflow server did not answer /health within {timeout:.0f} s:\n{server.log_tail()}"
            )
    return server


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pg.MlflowServer]:
    server = _start_auth_server(tmp_path_factory.mktemp("auth"), ADMIN_PASSWORD)
    try:
        assert server.proc.poll() is None, f"auth server exited:\n{server.log_tail()}"
        yield server
    finally:
        server.stop()


def _get(url: str, user: str | None = None, password: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_unauthenticated_requests_are_refused(auth_server: pg.MlflowServer) -> None:
    search = f"{auth_server.uri}/api/2.0/mlflow/experiments/search?max_results=5"
    assert _get(search)[0] == 401
    assert _get(f"{auth_server.uri}/")[0] == 401, "the UI must ask for a login too"
    assert _get(f"{auth_server.uri}/api/2.0/mlflow/registered-models/search")[0] == 401
    assert _get(search, ADMIN, "wrong-password-123")[0] == 401
    assert _get(search, "nobody-here", ADMIN_PASSWORD)[0] == 401
    status, body = _get(search, ADMIN, ADMIN_PASSWORD)
    assert status == 200, body[:500]
    assert "Default" in {e["name"] for e in json.loads(body).get("experiments", [])}
    # The compose healthchecks probe /health without credentials.
    assert _get(f"{auth_server.uri}/health")[0] == 200


def test_workers_log_in_with_the_tracking_credentials(
    auth_server: pg.MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a worker does: an MlflowClient with MLFLOW_TRACKING_USERNAME/PASSWORD writes; without them it is refused."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient(tracking_uri=auth_server.uri, registry_uri=auth_server.uri)
    with pytest.raises(MlflowException, match="401|[Uu]nauthori[sz]ed|credentials"):
        client.create_experiment("anonymous-write")

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    exp = client.create_experiment("worker-write")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "score", 0.5)
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.metrics == {"score": 0.5}


def test_server_refuses_to_start_with_the_placeholder_password(tmp_path: Path) -> None:
    """The `change-me` of .env.example never becomes the admin password: MLflow rejects it (under 12 characters)."""
    server = _start_auth_server(tmp_path / "placeholder", "change-me", timeout=120)
    try:
        if server.proc.poll() is None:
            status = _get(f"{server.uri}/api/2.0/mlflow/experiments/search", ADMIN, "change-me")[0]
            pytest.fail(f"the server started with the placeholder password (login answered {status})")
        assert server.proc.returncode != 0
        assert "12 characters" in server.log_tail(200), server.log_tail()
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------- malicious safetensors
def _safetensors(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    """A hand-crafted safetensors file: 8-byte little-endian header length (``length`` may lie), JSON, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _t(dtype: object = "F32", shape: object = (2, 2), offsets: object = (0, 16)) -> dict:
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
    }


HUGE = 2**62
MALICIOUS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "header_longer_than_file": (
        lambda p: _safetensors(p, {"w": _t()}, bytes(16), length=10_000),
        r"truncated or corrupt safetensors file \(header of 10000 bytes, file \d+\)",
    ),
    "header_length_2**63": (
        lambda p: _safetensors(p, {"w": _t()}, bytes(16), length=2**63 + 5),
        r"header of 9223372036854775813 bytes",
    ),
    "no_header": (
        lambda p: (p.write_bytes(b"\x01\x02"), p)[1],
        r"truncated safetensors file \(2 bytes, no header\)",
    ),
    "huge_shape": (
        lambda p: _safetensors(p, {"w": _t(shape=(HUGE, HUGE))}, bytes(16)),
        r"tensor w spans 16 bytes, its shape and dtype need at least \d+",
    ),
    "shape_of_many_huge_dims": (
        lambda p: _safetensors(p, {"w": _t(shape=[10**18] * 100_000)}, bytes(16)),
        r"tensor w spans 16 bytes, its shape and dtype need at least \d+",
    ),
    "huge_offsets": (
        lambda p: _safetensors(p, {"w": _t(shape=(HUGE // 4,), offsets=(0, HUGE))}, bytes(16)),
        r"truncated or corrupt safetensors file \(tensor w ends at data byte 4611686018427387904, the file holds 16\)",
    ),
    "offsets_past_the_file": (
        lambda p: _safetensors(p, {"a": _t(offsets=(0, 16)), "b": _t(offsets=(16, 32))}, bytes(16)),
        r"truncated or corrupt safetensors file \(tensor b ends at data byte 32, the file holds 16\)",
    ),
    "overlapping_offsets": (
        lambda p: _safetensors(p, {"a": _t(offsets=(0, 16)), "b": _t(offsets=(8, 24))}, bytes(24)),
        r"tensor b \(bytes 8-24\) overlaps tensor a",
    ),
    "same_offsets": (
        lambda p: _safetensors(p, {"a": _t(), "b": _t()}, bytes(16)),
        r"tensor b \(bytes 0-16\) overlaps tensor a",
    ),
    "reversed_offsets": (
        lambda p: _safetensors(p, {"w": _t(offsets=(16, 0))}, bytes(16)),
        r"tensor w: data_offsets \[16, 0\] end before they begin",
    ),
    "negative_offset": (
        lambda p: _safetensors(p, {"w": _t(offsets=(-16, 0))}, bytes(16)),
        r"tensor w: data_offsets \[-16, 0\] are not two non-negative integers",
    ),
    "offsets_not_integers": (
        lambda p: _safetensors(p, {"w": _t(offsets=("0", 16.0))}, bytes(16)),
        r"tensor w: data_offsets \['0', 16\.0\] are not two non-negative integers",
    ),
    "negative_dimension": (
        lambda p: _safetensors(p, {"w": _t(shape=(-2, -2))}, bytes(16)),
        r"tensor w: shape \[-2, -2\] is not a list of non-negative integers",
    ),
    "boolean_dimension": (
        lambda p: _safetensors(p, {"w": _t(shape=[True, 4])}, bytes(16)),
        r"tensor w: shape \[True, 4\] is not a list of non-negative integers",
    ),
    "wrong_dtype": (
        lambda p: _safetensors(p, {"w": _t(dtype="F128")}, bytes(16)),
        r"tensor w has unsupported dtype F128",
    ),
    "dtype_not_a_string": (
        lambda p: _safetensors(p, {"w": _t(dtype=["F32"])}, bytes(16)),
        r"tensor w has unsupported dtype \['F32'\]",
    ),
    "dtype_of_wrong_size": (
        lambda p: _safetensors(p, {"w": _t(dtype="F64")}, bytes(16)),
        r"tensor w spans 16 bytes, its shape and dtype need 32",
    ),
    "missing_fields": (
        lambda p: _safetensors(p, {"w": {"dtype": "F32"}}, bytes(16)),
        r"tensor w: shape None is not a list",
    ),
    "entry_not_an_object": (
        lambda p: _safetensors(p, {"w": [1, 2]}, bytes(16)),
        r"tensor w: header entry is not an object",
    ),
    "header_not_an_object": (
        lambda p: _safetensors(p, [1, 2, 3]),
        r"corrupt safetensors header \(not a JSON object\)",
    ),
    "not_json": (lambda p: _safetensors(p, b"{not json"), r"corrupt safetensors header$"),
    "not_utf8": (lambda p: _safetensors(p, b'{"\xff\xfe": 1}'), r"corrupt safetensors header$"),
    "integer_of_10000_digits": (
        lambda p: _safetensors(
            p, b'{"w": {"dtype": "F32", "shape": [' + b"9" * 10_000 + b'], "data_offsets": [0, 4]}}'
        ),
        r"corrupt safetensors header$",
    ),
    "deeply_nested": (
        lambda p: _safetensors(p, b"[" * 200_000 + b"]" * 200_000),
        r"corrupt safetensors header$",
    ),
    "hostile_tensor_name": (
        lambda p: _safetensors(p, {"evil\nname" + "x" * 5000: _t(dtype="F128")}, bytes(16)),
        r"tensor 'evil\\nnamex+\.\.\. has unsupported dtype F128",
    ),
}


@pytest.mark.parametrize("case", list(MALICIOUS))
def test_malicious_safetensors_header_is_a_one_line_error(case: str, tmp_path: Path) -> None:
    """Each hand-crafted file gives one MergeError line naming the file (and tensor), with no large allocation."""
    from mergelab.engine.io import CheckpointReader, MergeError, read_safetensors_header

    build, pattern = MALICIOUS[case]
    path = build(tmp_path / f"{case}.safetensors")
    for load in (read_safetensors_header, CheckpointReader):
        tracemalloc.start()
        try:
            with pytest.raises(MergeError) as err:
                load(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        message = str(err.value)
        assert "\n" not in message and len(message) < 400, message
        assert message.startswith(f"{path}: "), message
        assert re.search(pattern, message), message
        # Parsing the deeply nested case costs a few MB of JSON parser stack; nothing is sized from the header.
        assert peak < 64 * 2**20, f"{case}: {peak / 2**20:.0f} MiB allocated"


def test_well_formed_edge_cases_still_load(tmp_path: Path) -> None:
    """Zero-size tensors (even sharing an offset), metadata and any tensor order are valid safetensors."""
    import torch
    from safetensors.torch import save_file

    from mergelab.engine.io import CheckpointReader

    path = tmp_path / "ok.safetensors"
    tensors = {
        "b": torch.arange(6, dtype=torch.float32).view(2, 3),
        "a": torch.zeros(0, 4),
        "c": torch.ones(0),
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    reader = CheckpointReader(path)
    assert sorted(reader.keys()) == ["a", "b", "c"]
    assert torch.equal(reader.get("b"), tensors["b"]) and reader.get("a").shape == (0, 4)
    # Hand-written: a zero-size tensor whose offsets fall inside another tensor's bytes overlaps nothing.
    _safetensors(path, {"w": _t(), "empty": _t(shape=(0,), offsets=(8, 8))}, bytes(16))
    assert set(CheckpointReader(path).keys()) == {"w", "empty"}


# --------------------------------------------------------------------------------------------- no pickle, no remote code
PACKAGE = ROOT / "mergelab"
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}
UNSAFE_CALLS = {
    "torch.load": "unpickles",
    "torch.jit.load": "unpickles",
    "torch.serialization.load": "unpickles",
    "pd.read_pickle": "unpickles",
    "pandas.read_pickle": "unpickles",
    "yaml.load": "constructs arbitrary objects; use yaml.safe_load",
    "yaml.unsafe_load": "constructs arbitrary objects",
    "yaml.full_load": "constructs arbitrary objects",
    "mlflow.pyfunc.load_model": "unpickles the python model (cloudpickle)",
}
# `.from_pretrained` receivers that read no weights (tokenizers, processors); PeftModel is guarded in mergelab/hf.py
# (it falls back to torch.load without adapter_model.safetensors), see test_pickled_checkpoints_are_never_unpickled.
WEIGHTLESS_OR_GUARDED = re.compile(r"Tokenizer|Processor|_import\(ip_path\)|PeftModel")


def _package_trees() -> Iterator[tuple[str, ast.AST]]:
    for file in sorted(PACKAGE.rglob("*.py")):
        yield str(file.relative_to(ROOT)), ast.parse(file.read_text(), filename=str(file))


def _violations(rel: str, tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            yield from (f"{where}: imports {n}" for n in names if n.split(".")[0] in PICKLE_MODULES)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            pos_defaults = dict(zip([a.arg for a in args.args][::-1], args.defaults[::-1], strict=False))
            kw_defaults = {
                a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None
            }
            default = {**pos_defaults, **kw_defaults}.get("trust_remote_code")
            if default is not None and not (isinstance(default, ast.Constant) and default.value is False):
                yield f"{where}: {node.name}(trust_remote_code=...) must default to False"
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        if func in UNSAFE_CALLS:
            yield f"{where}: {func}() {UNSAFE_CALLS[func]}"
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        if (
            func in ("np.load", "numpy.load")
            and ast.unparse(kwargs.get("allow_pickle", ast.Constant(False))) != "False"
        ):
            yield f"{where}: {func}(allow_pickle=...)"
        if "weights_only" in kwargs and ast.unparse(kwargs["weights_only"]) != "True":
            yield f"{where}: weights_only={ast.unparse(kwargs['weights_only'])}"
        if "trust_remote_code" in kwargs:
            value = kwargs["trust_remote_code"]
            # Only False, or a value passed through from the caller's / config's own `trust_remote_code`.
            passed = "trust_remote_code" in ast.unparse(value)
            if not ((isinstance(value, ast.Constant) and value.value is False) or passed):
                yield f"{where}: trust_remote_code={ast.unparse(value)} is not the config's own choice"
        if func.endswith(".from_pretrained") and not WEIGHTLESS_OR_GUARDED.search(func):
            if ast.unparse(kwargs.get("use_safetensors", ast.Constant(None))) != "True":
                yield f"{where}: {func}() without use_safetensors=True may unpickle *.bin weights"


def _code_only(path: Path) -> str:
    """The file's code tokens: strings and comments dropped."""
    import io
    import tokenize

    toks = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return " ".join(t.string for t in toks if t.type not in (tokenize.STRING, tokenize.COMMENT))


def test_no_pickle_on_the_load_path_and_remote_code_only_when_a_config_asks() -> None:
    """Static audit of mergelab/: no unpickling API anywhere, trust_remote_code never switched on by the package."""
    found = [v for rel, tree in _package_trees() for v in _violations(rel, tree)]
    assert not found, "\n".join(found)
    code = "\n".join(_code_only(f) for f in PACKAGE.rglob("*.py"))  # docstrings and messages may name the flag
    assert "trust_remote_code=True" not in code.replace(" ", "")


def test_the_audit_catches_what_it_forbids() -> None:
    bad = """
import pickle
from joblib import load
def f(path, trust_remote_code=True):
    torch.load(path)
    yaml.load(open(path))
    np.load(path, allow_pickle=True)
    torch.load(path, weights_only=False)
    AutoModel.from_pretrained(path, trust_remote_code=True)
    AutoModel.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, use_safetensors=True)
"""
    found = list(_violations("bad.py", ast.parse(bad)))
    assert [v.split(": ", 1)[1] for v in found] == [
        "imports pickle",
        "imports joblib",
        "f(trust_remote_code=...) must default to False",
        "torch.load() unpickles",
        "yaml.load() constructs arbitrary objects; use yaml.safe_load",
        "np.load(allow_pickle=...)",
        "torch.load() unpickles",
        "weights_only=False",
        "trust_remote_code=True is not the config's own choice",
        "AutoModel.from_pretrained() without use_safetensors=True may unpickle *.bin weights",
    ], found


class _Trap:
    """Unpickling this creates the file ``path``: proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def test_pickled_checkpoints_are_never_unpickled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full checkpoint and a LoRA adapter holding only (booby-trapped) pickles are refused by every loader."""
    import pickle  # the test writes the trap; the package never imports it

    import torch

    from mergelab.engine.adapters import LoraAdapter
    from mergelab.engine.io import CheckpointReader, MergeError
    from mergelab.hf import load_model

    sentinel = tmp_path / "UNPICKLED"
    trap = pickle.dumps(_Trap(sentinel))

    def _no_torch_load(*a: object, **k: object) -> None:
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", _no_torch_load)
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    (full / "pytorch_model.bin").write_bytes(trap)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": str(full)}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    (adapter / "adapter_model.bin").write_bytes(trap)

    with pytest.raises(MergeError, match="pickle is never loaded"):
        CheckpointReader(full)
    with pytest.raises(MergeError, match="not a safetensors file"):
        CheckpointReader(full / "pytorch_model.bin")
    with pytest.raises(MergeError, match="pickled adapters are refused"):
        LoraAdapter(adapter, base_keys=["model.embed_tokens.weight"])
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_model(full)
    with pytest.raises(FileNotFoundError, match="pickled adapters are never loaded"):
        load_model(adapter)
    assert not sentinel.exists()
