"""Test-wide settings: never touch the network, keep torch to the machine's cores."""

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "clt_pipe" / "demo" / "assets" / "tiny-clip.json"


@pytest.fixture
def tiny_model_config() -> pathlib.Path:
    """A tiny open_clip CLIP config (6 layers, width 64, 32 px, 8 px patches -> 17 tokens)."""
    return TINY_MODEL


FEW_DIGITS = 192  # three training steps of 64


@contextlib.contextmanager
def few_training_digits():
    """The tiny CLIP's trainer sees only the first ``FEW_DIGITS`` training digits. Three steps still draw
    every source of randomness the determinism tests are about (init, shuffling, templates, shifts) in a
    tenth of an epoch's time; the test split and the zero-shot probe are unchanged."""
    from clt_pipe.demo import tinyclip as tc

    real = tc.load_digits_arrays

    def first_few(split, *args, **kw):
        images, labels, idx = real(split, *args, **kw)
        return images[:FEW_DIGITS], labels[:FEW_DIGITS], idx[:FEW_DIGITS]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tc, "load_digits_arrays", first_few)
        yield


@pytest.fixture(scope="session")
def tiny_clip_few_steps(tmp_path_factory):
    """The demo's tiny CLIP after one epoch over ``few_training_digits`` (seed 0), once per test session: the
    determinism and cache tests compare against it instead of each training their own."""
    from clt_pipe.demo import tinyclip as tc

    with few_training_digits():
        return tc.train_tiny_clip(tmp_path_factory.mktemp("tiny-clip-few"), seed=0, epochs=1)


@pytest.fixture
def warm_cli():
    """Real ``clt-pipe`` child processes that start warm (``clt_pipe.testing.cliprocess``): returns its
    ``start_cli``. Its forkserver is started right after collection when a selected test asks for it."""
    from clt_pipe.testing import cliprocess

    cliprocess.warm_forkserver()
    return cliprocess.start_cli


def pytest_collection_modifyitems(config, items):
    # The forkserver imports torch and open_clip (~5 s) on the other core while the tests before it run.
    if any("warm_cli" in getattr(item, "fixturenames", ()) for item in items):
        from clt_pipe.testing import cliprocess

        cliprocess.warm_forkserver()


@pytest.fixture
def one_torch_thread():
    """Tiny models: one intra-op thread is ~10x faster than two fighting other processes."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run_cli(capsys, monkeypatch, args: list[str]) -> tuple[int, str, str]:
    """Run the real `clt-pipe` entry point in-process; (exit code, stdout, stderr)."""
    import sys

    from clt_pipe.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["clt-pipe", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """A failed command printed exactly one ``error:`` line, no traceback, naming every needle."""
    assert code != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip().startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    return lines[0]


@contextlib.contextmanager
def moto_s3(bucket: str):
    """A local S3 server with ``bucket`` made; the S3 environment points at it while the context lasts. Yields
    the s3fs file system. The server is moto on 127.0.0.1, or, when ``CLT_PIPE_TEST_S3_ENDPOINT`` is set, that
    real S3-compatible server (with ``CLT_PIPE_TEST_S3_KEY`` / ``CLT_PIPE_TEST_S3_SECRET``; e.g. Ceph radosgw
    on loopback): the bucket is made there and removed with its objects afterwards."""
    import logging

    import s3fs

    mp = pytest.MonkeyPatch()
    server, endpoint = None, os.environ.get("CLT_PIPE_TEST_S3_ENDPOINT")
    key, secret = os.environ.get("CLT_PIPE_TEST_S3_KEY", "test"), os.environ.get("CLT_PIPE_TEST_S3_SECRET", "test")
    if not endpoint:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": endpoint}.items():
        mp.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = None
    try:
        fs = s3fs.S3FileSystem()
        fs.mkdir(bucket)
        yield fs
    finally:
        if server is None and fs is not None:  # a real server keeps what it is given: leave it as found
            fs.rm(bucket, recursive=True)
        s3fs.S3FileSystem.clear_instance_cache()
        if server is not None:
            server.stop()
        mp.undo()
