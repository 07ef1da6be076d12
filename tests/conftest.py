"""Test-wide settings and shared fixtures: never touch the network, one torch thread."""

import contextlib
import gc
import json
import os
import shutil
import tempfile
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from a second intra-op thread, and two fight the helper processes for 2 cores.
torch.set_num_threads(1)

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "clt_pipe" / "demo" / "assets" / "tiny-clip.json"


@pytest.fixture
def tiny_model_config() -> pathlib.Path:
    """A tiny open_clip CLIP config (6 layers, width 64, 32 px, 8 px patches -> 17 tokens)."""
    return TINY_MODEL


ANALYZE_N_FEATURES = 128


@pytest.fixture(scope="session")
def tiny_seeded_weights(tmp_path_factory) -> pathlib.Path:
    """A checkpoint file of the tiny CLIP's seeded random init (seed 1234): every harvest of a test and every
    reference forward uses the same model."""
    import open_clip

    open_clip.add_model_config(str(TINY_MODEL))
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("weights") / "tiny-seeded.pt"
    torch.save(open_clip.create_model("tiny-clip").state_dict(), path)
    return path


@pytest.fixture(scope="session")
def analyze_env(tmp_path_factory):
    """A tiny store (24 images, all tokens, several chunks) of a reloadable tiny CLIP, and a random CLT: what
    the analysis and report tests run against."""
    from clt_pipe.backbone.loading import load_backbone
    from clt_pipe.clt.model import CrossLayerTranscoder
    from clt_pipe.clt.rundir import load_fitted, save_fitted
    from clt_pipe.clt.spec import CLTSpec
    from clt_pipe.config import HarvestConfig, build
    from clt_pipe.harvest.run import run_harvest
    from clt_pipe.store.reader import ActivationStore
    from clt_pipe.testing.fakedata import make_fake_imagefolder

    root = tmp_path_factory.mktemp("analyze")
    data = make_fake_imagefolder(root / "data", classes=("cat", "dog", "fox", "owl"), per_class=6, size=32)
    torch.manual_seed(0)
    bb = load_backbone(str(TINY_MODEL), "none", "cpu")
    ckpt = root / "tiny.pt"
    torch.save(bb.model.state_dict(), ckpt)
    store_url = str(root / "store.zarr")
    hcfg = build(HarvestConfig, {"model": str(TINY_MODEL), "pretrained": str(ckpt), "dataset": "imagefolder",
                                 "data_root": str(root / "data"), "split": "train", "store": store_url,
                                 "tokens": "all", "chunk_mb": 0.05, "chunks_per_shard": 2, "batch_size": 8,
                                 "template_sets": ["single"], "device": "cpu", "data_workers": 1})
    run_harvest(hcfg, log=lambda *a: None)
    store = ActivationStore(store_url)
    torch.manual_seed(1)
    clt = CrossLayerTranscoder(CLTSpec(store.n_layers, store.d_model, ANALYZE_N_FEATURES, "relu_topk", 8))
    run_dir = root / "clt-run"
    save_fitted(run_dir, clt, {"store": {"url": store_url, "fingerprint": store.meta.fingerprint,
                                         "model": store.model, "n_layers": store.n_layers,
                                         "d_model": store.d_model}})
    model, _ = load_fitted(run_dir)
    bb = load_backbone(str(TINY_MODEL), str(ckpt), "cpu")
    return {"root": root, "data": data, "store_url": store_url, "store": store, "run_dir": run_dir,
            "clt": model, "bb": bb, "ckpt": ckpt}


def analyze_config(env, **kw):
    """An AnalyzeConfig for ``analyze_env`` with small retrieval settings; ``kw`` overrides."""
    from clt_pipe.config import AnalyzeConfig, build

    base = {"store": env["store_url"], "clt": str(env["run_dir"]), "out": str(env["root"] / "report"),
            "data_root": str(env["root"] / "data"), "device": "cpu", "batch_size": 8, "retrieval_queries": 3,
            "retrieval_k": 3, "read_threads": 2}
    base.update(kw)
    return build(AnalyzeConfig, base)


@pytest.fixture(scope="session")
def full_report(analyze_env):
    """Every analysis part of ``analyze_env`` run once per session: (its config, run_analyze's summary). The
    report's own assertions and the browser check read the same files."""
    from clt_pipe.analyze.run import run_analyze

    cfg = analyze_config(analyze_env, out=str(analyze_env["root"] / "full-report"), ablation_keep=2)
    return cfg, run_analyze(cfg)


@pytest.fixture(scope="session")
def page_checker():
    """One headless chromium for every page check of the session (``clt_pipe.testing.browser.PageChecker``);
    the test is skipped where playwright or a chromium is missing."""
    from clt_pipe.testing.browser import PageChecker, browser_missing

    why = browser_missing()
    if why:
        pytest.skip(why)
    with PageChecker() as check:
        yield check


SHORT_EPOCHS = 6  # the tiny CLIP's short schedule: zero-shot top-1 0.66 on the digits test split (chance 0.1)
_short_training: dict = {}


def _start_short_training() -> dict:
    """Starts the training from a thread: forking the first child waits for the forkserver's imports."""
    if not _short_training:
        from tests import warmcli

        root = pathlib.Path(tempfile.mkdtemp(prefix="clt-pipe-tiny-clip-"))

        def start():
            _short_training["proc"] = warmcli.start_tiny_clip_training(root / "short", SHORT_EPOCHS)

        _short_training.update(root=root, starter=threading.Thread(target=start, daemon=True))
        _short_training["starter"].start()
    return _short_training


@pytest.fixture(scope="session")
def tiny_clip_short_run():
    """The demo's tiny CLIP trained for ``SHORT_EPOCHS`` (seed 0): (its artifacts, the progress calls). The
    training runs in a warm child started right after collection, on the other core while the first tests
    run; the fixture waits for it."""
    from clt_pipe.demo import tinyclip as tc

    bg = _start_short_training()
    bg["starter"].join()
    assert bg["proc"].wait(900) == 0, bg["proc"].stderr()[-3000:]
    arts = tc.read_valid_cache(bg["root"] / "short", seed=0, epochs=SHORT_EPOCHS)
    assert arts is not None, "the background training left no valid artifacts"
    calls = [tuple(c) for c in json.loads((bg["root"] / "progress.json").read_text())]
    yield arts, calls
    shutil.rmtree(bg["root"], ignore_errors=True)


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
    """Real ``clt-pipe`` child processes that start warm (``tests/warmcli.py``): returns its ``start_cli``. Its
    forkserver is started right after collection when a selected test asks for it (pytest_collection_finish),
    before dask could start one with its own preload."""
    from tests import warmcli

    return warmcli.start_cli


def _freeze_survivors(phase, info):
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()


def pytest_collection_finish(session):
    # torch, open_clip, transformers, zarr and dask leave millions of long-lived objects, and every full
    # collection walked them all (~0.3 s each, ~20 per run, five more at pytest's exit). What survives a full
    # collection is frozen (still freed by reference counting), so the next one walks only what is newer.
    gc.collect()
    gc.freeze()
    gc.callbacks.append(_freeze_survivors)
    # Work for later tests starts now, on the other core, while the tests before them run: the forkserver
    # imports torch and open_clip (~5 s), then the tiny CLIP's short training forks from it (~7 s). Only for
    # what the selected tests (after -k and -m) use.
    wanted = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    if "warm_cli" in wanted:
        from tests import warmcli

        warmcli.warm_forkserver()
    if "tiny_clip_short_run" in wanted:
        _start_short_training()


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
